"""The adversarial iteration plays the paper's min-max game (section 2.3)."""

import pytest
import torch
from monai.engines.utils import IterationEvents

from bundle.engines import CRITIC_LOSS, SegANTrainer
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


def _trainer(seg_lr=1e-3, critic_lr=1e-3, clip=0.05, epochs=1, iterations=1, device="cpu", **kwargs):
    torch.manual_seed(0)
    seg = SegANSegmentor(in_channels=2, out_channels=2, features=FEATURES).to(device)
    critic = SegANCritics(in_channels=2, num_regions=2, features=(4, 8, 16)).to(device)
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
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
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


def test_amp_on_a_cpu_takes_the_scaler_path_and_matches_full_precision():
    # What this covers on a CPU: with amp=True the trainer holds a gradient scaler and every update goes through
    # scaler.scale / step / update; autocast("cuda") and the scaler disable themselves without a GPU, so the
    # result must equal the full-precision run exactly. What AMP changes on a GPU is checked by the next test.
    runs = {}
    for amp in (False, True):
        trainer = _trainer(amp=amp, iterations=2)
        trainer.run()
        runs[amp] = trainer
    assert runs[False].scaler is None and runs[True].scaler is not None
    assert torch.equal(runs[True].state.output["loss"], runs[False].state.output["loss"])
    for a, b in zip(runs[True].network.parameters(), runs[False].network.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast to float16 needs a CUDA device")
def test_amp_runs_the_segmentor_and_critic_in_half_precision_on_a_gpu():
    trainer = _trainer(amp=True, device=torch.device("cuda"))
    dtypes = {}
    for name, net in (("segmentor", trainer.network), ("critic", trainer.critic)):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out, name=name: dtypes.setdefault(name, out.dtype))
    trainer.run()
    assert dtypes == {"segmentor": torch.float16, "critic": torch.float16}
    assert torch.isfinite(trainer.state.output["loss"]) and torch.isfinite(trainer.state.output[CRITIC_LOSS])
