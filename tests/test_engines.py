"""The adversarial iteration plays the paper's min-max game (section 2.3)."""

import numpy as np
import pytest
import torch
from monai.engines.utils import IterationEvents

from bundle.engines import CRITIC_LOSS, LOSS_TERMS, LossShareLogger, SegANTrainer
from bundle.losses import MultiScaleL1Loss
from bundle.networks import SegANCritics, SegANSegmentor

FEATURES = (4, 8, 16, 32)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(4, 2, 16, 16, generator=g)
    label = torch.zeros(4, 2, 16, 16)
    label[:, 0, 4:12, 4:12] = 1
    label[:, 1, 6:10, 6:10] = 1
    return {"image": image, "label": label}


def _trainer(seg_lr=1e-3, critic_lr=1e-3, clip=0.05, epochs=1, iterations=1, device="cpu", clip_params="all", **kwargs):
    torch.manual_seed(0)
    seg = SegANSegmentor(in_channels=2, out_channels=2, features=FEATURES).to(device)
    critic = SegANCritics(in_channels=2, num_regions=2, features=(4, 8, 16), clip_params=clip_params).to(device)
    trainer = SegANTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=[_batch()] * iterations,
        network=seg,
        critic=critic,
        optimizer=torch.optim.SGD(seg.parameters(), lr=seg_lr),
        critic_optimizer=torch.optim.SGD(critic.parameters(), lr=critic_lr),
        clip=clip,
        **kwargs,
    )
    return trainer


def _loss(trainer, pred=None):
    """The multi-scale loss of the current critics for a given prediction (default: the segmentor's)."""
    b = _batch()
    with torch.no_grad():
        if pred is None:
            trainer.network.train()
            pred = torch.sigmoid(trainer.network(b["image"]))
        trainer.critic.train()
        return MultiScaleL1Loss()(trainer.critic(b["image"], pred), trainer.critic(b["image"], b["label"])).item()


def test_critic_step_raises_the_loss_for_a_fixed_segmentor():
    trainer = _trainer(seg_lr=0.0)
    trainer.critic.clamp_(trainer.clip)  # compare within the clamped family the critic lives in
    with torch.no_grad():
        trainer.network.train()
        fixed = torch.sigmoid(trainer.network(_batch()["image"]))
    before = _loss(trainer, fixed)
    trainer.run()
    after = _loss(trainer, fixed)
    assert after > before


def test_critic_weights_stay_within_the_clamp():
    trainer = _trainer(critic_lr=10.0, clip=0.01, iterations=3)
    trainer.run()
    values = torch.cat([p.detach().flatten() for p in trainer.critic.parameters()])
    assert values.abs().max() <= 0.01 + 1e-8
    assert values.abs().max() > 0.009  # the large step pushed weights onto the bound


def test_segmentor_step_lowers_the_loss_through_a_fixed_critic():
    trainer = _trainer(seg_lr=0.5, critic_lr=0.0, clip=None, epochs=5)
    before = _loss(trainer)
    trainer.run()
    assert _loss(trainer) < before


def test_segmentor_gets_gradients_only_through_the_critic():
    trainer = _trainer(seg_lr=0.0, critic_lr=0.0, clip=None)
    seen = {}

    def before_backward(engine):  # the critic step is done, the segmentor's backward not yet
        seen["critic"] = [p.grad.clone() for p in engine.critic.parameters()]
        seen["seg"] = [p.grad for p in engine.network.parameters()]

    def after_backward(engine):
        seen["critic_after"] = [p.grad for p in engine.critic.parameters()]
        seen["seg_after"] = [p.grad for p in engine.network.parameters()]

    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, before_backward)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, after_backward)
    trainer.run()
    # the critic step detached the prediction: no gradient reached S
    assert all(g is None for g in seen["seg"])
    # the segmentor step reached S through the frozen critics, leaving their gradients untouched
    assert any(g is not None and g.abs().sum() > 0 for g in seen["seg_after"])
    for before, after in zip(seen["critic"], seen["critic_after"]):
        torch.testing.assert_close(before, after)


def test_engine_output_holds_both_losses_and_iteration_events_fire():
    trainer = _trainer(dice_weight=1.0)
    fired = []
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, ev=event: fired.append(ev))
    trainer.run()
    out = trainer.state.output
    assert {"image", "label", "pred", "loss", CRITIC_LOSS, "adversarial_loss"} <= set(out)
    assert out["loss"].item() > out["adversarial_loss"].item()  # the Dice term is added
    assert 0.0 <= out["pred"].min() and out["pred"].max() <= 1.0
    assert len(fired) == 4


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="dice_weight"):
        _trainer(dice_weight=-1.0)
    with pytest.raises(ValueError, match="critic_steps"):
        _trainer(critic_steps=0)


def test_amp_on_a_cpu_runs_the_networks_in_bfloat16_and_the_game_in_float32():
    """GPU numerics, checked on a CPU: autocast wraps the networks only; the probability maps the critics compare
    and every loss stay float32 (bfloat16 sigmoids saturate at 0.9961 from a logit of ~5.5)."""
    trainer = _trainer(amp=True, amp_kwargs={"dtype": torch.bfloat16}, iterations=2, dice_weight=1.0)
    dtypes = {}
    for name, net in (("segmentor", trainer.network), ("critic", trainer.critic)):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out, name=name: dtypes.setdefault(name, out.dtype) and None)
    trainer.run()
    out = trainer.state.output
    assert dtypes == {"segmentor": torch.bfloat16, "critic": torch.bfloat16}
    assert out["pred"].dtype == torch.float32
    for key in ("loss", "adversarial_loss", CRITIC_LOSS, LOSS_TERMS):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all()
    # the float32 maps resolve what bfloat16 collapses: distinct probabilities above 0.996
    logits = torch.linspace(5.5, 6.0, 9)
    assert torch.sigmoid(logits.to(torch.bfloat16)).unique().numel() == 1
    assert torch.sigmoid(logits).unique().numel() == 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast to float16 needs a CUDA device")
def test_amp_runs_the_segmentor_and_critic_in_half_precision_on_a_gpu():
    trainer = _trainer(amp=True, device=torch.device("cuda"))
    dtypes = {}
    for name, net in (("segmentor", trainer.network), ("critic", trainer.critic)):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out, name=name: dtypes.setdefault(name, out.dtype) and None)
    trainer.run()
    assert dtypes == {"segmentor": torch.float16, "critic": torch.float16}
    assert torch.isfinite(trainer.state.output["loss"]) and torch.isfinite(trainer.state.output[CRITIC_LOSS])


@pytest.mark.parametrize("clip_params", ["all", "weights"])
@pytest.mark.parametrize("layers", ["all", "first", "last", [0, 2]])
def test_every_loss_layer_choice_and_clamp_choice_trains_one_iteration(layers, clip_params):
    trainer = _trainer(critic_lr=10.0, clip=0.01, clip_params=clip_params, loss_function=MultiScaleL1Loss(layers))
    before = [p.detach().clone() for p in trainer.critic.parameters()]
    seg_before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    after = list(trainer.critic.parameters())
    moved = any(not torch.equal(b, a) for b, a in zip(before, after))
    # S3-3C-s0 compares only the masked inputs: no critic parameter is in its graph, so no critic step at all
    assert moved == (layers != "first")
    assert all(p.abs().max() <= 0.01 + 1e-8 for p in after) or layers == "first"
    assert any(not torch.equal(b, a) for b, a in zip(seg_before, trainer.network.parameters()))
    assert torch.isfinite(trainer.state.output["loss"])


def test_weights_clamp_leaves_the_critic_batchnorm_without_scale_and_shift():
    with_affine = SegANCritics(in_channels=2, num_regions=2, features=(4, 8, 16), clip_params="all")
    conv_only = SegANCritics(in_channels=2, num_regions=2, features=(4, 8, 16), clip_params="weights")
    norms = [m for m in conv_only.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight is None and m.bias is None for m in norms)
    assert all(p.dim() > 1 or "conv" in n for n, p in conv_only.named_parameters())
    assert sum(p.numel() for p in with_affine.parameters()) > sum(p.numel() for p in conv_only.parameters())
    with pytest.raises(ValueError, match="clip_params"):
        SegANCritics(clip_params="bn")


def test_layer_terms_sum_to_the_adversarial_loss_and_are_logged_per_region(caplog):
    trainer = _trainer(iterations=2)
    LossShareLogger(["whole", "core"]).attach(trainer)
    with caplog.at_level("INFO"):
        trainer.run()
    terms = trainer.state.output[LOSS_TERMS]
    assert terms.shape == (2, 4)  # 2 critics (regions) x 4 layers (masked input + 3 blocks)
    torch.testing.assert_close(terms.sum(), trainer.state.output["adversarial_loss"])
    shares = trainer.state.loss_shares
    assert list(shares) == ["whole", "core"] and all(abs(sum(row) - 1.0) < 1e-3 for row in shares.values())
    assert any("whole:" in r.getMessage() and "core:" in r.getMessage() for r in caplog.records)


def _demo_slices(shape=(64, 64, 24), crop=32, slices=8):
    """A few normalised axial slices of a synthetic BraTS-like case: real-looking tissue contrast and tumours."""
    from bundle.phantom import make_demo_case

    images, label = make_demo_case(shape=shape, seed=0, index=1)
    h0 = (shape[0] - crop) // 2
    x = torch.tensor(np.stack([images[m] for m in ("t1c", "t2", "flair")]))[:, h0 : h0 + crop, h0 : h0 + crop]
    x = torch.where(x > 0, (x - x[x > 0].mean()) / x[x > 0].std(), x)
    lab = torch.tensor(label[h0 : h0 + crop, h0 : h0 + crop]).long()
    y = torch.stack([torch.isin(lab, torch.tensor(v)) for v in ([1, 2, 4], [1, 4], [4])]).float()
    z = torch.argsort(-y[0].sum((0, 1)))[:slices]  # the slices with the most tumour
    return {"image": x[..., z].permute(3, 0, 1, 2).contiguous(), "label": y[..., z].permute(3, 0, 1, 2).contiguous()}


@pytest.mark.parametrize("clip_params, deep_share", [("weights", 0.3), ("all", None)])
def test_deeper_critic_layers_carry_the_loss_with_the_default_clamp(clip_params, deep_share):
    """The issue's measurement in small: clamping BN too leaves ~94 % of the loss on layer 0 (the masked input)."""
    batch = _demo_slices()
    torch.manual_seed(0)
    seg = SegANSegmentor(in_channels=3, out_channels=3, features=(16, 32, 64, 128))
    critic = SegANCritics(in_channels=3, num_regions=3, features=(16, 32, 64), clip_params=clip_params)
    trainer = SegANTrainer(
        "cpu",
        1,
        [batch] * 5,
        seg,
        critic,
        torch.optim.RMSprop(seg.parameters(), lr=2e-5),
        torch.optim.RMSprop(critic.parameters(), lr=2e-5),
        clip=0.01,
    )
    trainer.run()
    terms = trainer.state.output[LOSS_TERMS]
    share_deep = float(terms[:, 1:].sum() / terms.sum())
    if deep_share is None:
        assert share_deep < 0.2  # the flattened loss of the literal reading
    else:
        assert share_deep > deep_share


def test_several_critic_steps_go_through_one_gradient_scaler():
    """With amp, each critic step is followed by a scaler update (a scaler refuses a second step() before update()).

    A CPU gradient scaler stands in for the CUDA one that ``amp=True`` creates on a GPU."""
    from ignite.engine import Events

    trainer = _trainer(amp=True, iterations=2, critic_steps=2)

    @trainer.on(Events.ITERATION_STARTED)
    def _cpu_scaler(engine):
        if not isinstance(engine.scaler, torch.amp.GradScaler) or engine.scaler._device != "cpu":
            engine.scaler = torch.amp.GradScaler("cpu")

    trainer.run()
    assert trainer.scaler.get_scale() > 0


def _air_batch():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(8, 2, 32, 32, generator=g) + 0.5
    image[..., :10] = 0  # the air the intensity normalisation zeroes, along the input's border
    label = torch.zeros(8, 1, 32, 32)
    label[:, 0, 10:22, 14:26] = (image[:, 0, 10:22, 14:26] > 1.0).float()
    return {"image": image, "label": label}


@pytest.mark.parametrize("input_mode, paints_air", [("masked", True), ("masked_map", False), ("shifted", False)])
def test_a_segmentor_that_starts_painting_everywhere_unlearns_the_air_only_when_the_critic_sees_it(
    input_mode, paints_air
):
    """Xue et al. 2018's literal x o S(x) gives the loss no gradient where x = 0: a segmentor whose output starts
    at ~0.95 everywhere keeps painting the air; a critic input that sees every prediction trains it away."""
    # adversarial dynamics differ with the thread count's rounding: one thread on every machine, restored after
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        air = _air_after_training(input_mode)
    finally:
        torch.set_num_threads(threads)
    painted = (air > 0.5).float().mean()  # the share of air voxels labelled tumour
    if paints_air:
        assert painted > 0.5
    else:
        assert painted < 0.05 and air.mean() < 0.1


def _air_after_training(input_mode):
    torch.manual_seed(0)
    seg = SegANSegmentor(in_channels=2, out_channels=1, features=(8, 16, 32, 64))
    with torch.no_grad():
        seg.head[1].conv.bias.fill_(3.0)
    critic = SegANCritics(in_channels=2, num_regions=1, features=(8, 16, 32), input_mode=input_mode)
    adam = dict(lr=1e-2, betas=(0.5, 0.999))
    trainer = SegANTrainer(
        "cpu",
        1,
        [_air_batch()] * 40,
        seg,
        critic,
        torch.optim.Adam(seg.parameters(), **adam),
        torch.optim.Adam(critic.parameters(), **adam),
        clip=0.05,
    )
    trainer.run()
    seg.eval()
    with torch.no_grad():
        return torch.sigmoid(seg(_air_batch()["image"]))[..., :10]
