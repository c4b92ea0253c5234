"""Moeskops et al. 2017: the two segmentation networks, the discriminator (section 2.2) and the
three alternating updates Ls, Ld, La (section 2.3)."""

import pytest
import torch

from bundle.engines import ADVERSARIAL_LOSS
from bundle.moeskops import DISCRIMINATOR_LOSS, MoeskopsDilatedNet, MoeskopsDiscriminator, MoeskopsFCN, MoeskopsTrainer


def _conv_parameters(network):
    return sum(p.numel() for m in network.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())


def _receptive_field(network, channels=2, size=96):
    """Side of the input region the centre output pixel depends on, measured by its gradient."""
    network.eval()
    x = torch.rand(1, channels, size, size, requires_grad=True)
    network(x)[0, 1, size // 2, size // 2].backward()
    rows, cols = (x.grad.abs().sum((0, 1)) > 0).nonzero(as_tuple=True)
    assert rows.max() - rows.min() == cols.max() - cols.min()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("network, field", [(MoeskopsFCN, 31), (MoeskopsDilatedNet, 67)])
def test_receptive_fields_are_the_papers(network, field):
    torch.manual_seed(0)
    network = network(2, 3, features=8)
    assert network.receptive_field == field
    assert _receptive_field(network) == field


@pytest.mark.parametrize("network", [MoeskopsFCN, MoeskopsDilatedNet])
def test_a_slice_maps_to_class_logits_of_the_same_size(network):
    net = network(in_channels=3, num_classes=4, features=4)
    assert net(torch.rand(2, 3, 32, 40)).shape == (2, 4, 32, 40)


@pytest.mark.parametrize("classes, fcn, dilated", [(7, 140_039, 56_039), (8, 140_296, 56_072)])
def test_trainable_weights_count_as_in_the_paper(classes, fcn, dilated):
    assert _conv_parameters(MoeskopsFCN(1, classes)) == fcn
    assert _conv_parameters(MoeskopsDilatedNet(1, classes)) == dilated


def test_discriminator_concatenates_image_features_with_the_segmentation():
    disc = MoeskopsDiscriminator(in_channels=3, num_classes=4, features=4, hidden=8)
    assert disc.image_path[0].conv.in_channels == 3
    assert disc.joint_path[0].conv.in_channels == 4 + 4  # image features + one channel per class
    assert disc(torch.rand(5, 3, 25, 25), torch.rand(5, 4, 21, 21)).shape == (5, 2)
    with pytest.raises(ValueError, match="4-class segmentation patches of 21x21"):
        disc(torch.rand(5, 3, 25, 25), torch.rand(5, 3, 21, 21))


# --- the adversarial training procedure (section 2.3) ---

CLASSES = 3


def _batch(n=6, size=25):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, 2, size, size, generator=g)
    classes = torch.zeros(n, size, size, dtype=torch.long)
    classes[:, 6:18, 6:18] = 1
    classes[:, 9:14, 9:14] = 2
    return {"image": image, "label": torch.nn.functional.one_hot(classes, CLASSES).permute(0, 3, 1, 2).float()}


def _trainer(seg_lr=1e-2, disc_lr=1e-2, n=6, log=None, **kwargs):
    torch.manual_seed(0)
    seg = MoeskopsFCN(2, CLASSES, features=4, layers=3, hidden=8, dropout=0.0)
    disc = MoeskopsDiscriminator(2, CLASSES, features=4, hidden=8, dropout=0.0)

    class Logged(torch.optim.SGD):
        def __init__(self, name, *args, **kw):
            super().__init__(*args, **kw)
            self.name = name

        def step(self, closure=None):
            if log is not None:
                log.append(f"{self.name}.step")
            return super().step(closure)

    if log is not None:
        disc.register_forward_pre_hook(
            lambda m, args: log.append(
                ("manual" if set(args[1].unique().tolist()) <= {0.0, 1.0} else "generated", len(args[0]))
            )
        )
    return MoeskopsTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[_batch(n)],
        network=seg,
        discriminator=disc,
        optimizer=Logged("segmenter", seg.parameters(), lr=seg_lr),
        discriminator_optimizer=Logged("discriminator", disc.parameters(), lr=disc_lr),
        **kwargs,
    )


def test_updates_alternate_ls_ld_la_each_on_a_third_of_the_batch_with_their_own_optimiser():
    log = []
    trainer = _trainer(n=6, log=log)
    trainer.run()
    assert log == [
        "segmenter.step",  # Ls
        ("manual", 2),
        "discriminator.step",  # Ld: the discriminator on manual segmentations
        ("generated", 2),
        "segmenter.step",
        "discriminator.step",  # La: both networks, on generated ones
    ]
    out = trainer.state.output
    assert out["pred"].shape == out["label"].shape == (2, CLASSES, 25, 25)
    assert {"loss", DISCRIMINATOR_LOSS, ADVERSARIAL_LOSS} <= set(out)


def _generated_loss(trainer, batch):
    """The discriminator's loss for calling the segmenter's output GENERATED, on the batch's La third."""
    image = batch["image"][16:]
    with torch.no_grad():
        probs = torch.softmax(trainer.network(image), 1)
        logits = trainer.discriminator(image, probs[:, :, 2:-2, 2:-2])
        target = torch.full((len(logits),), MoeskopsDiscriminator.GENERATED)
        return torch.nn.functional.cross_entropy(logits, target).item()


def test_la_moves_the_segmenter_up_the_discriminators_loss():
    # the discriminator fixed (lr 0), the batch fixed, and the 25x25 images are one discriminator patch each;
    # 8 patches per update, as BatchNorm over 2 samples would leave almost no gradient
    trainer = _trainer(seg_lr=1e-2, disc_lr=0.0, n=24, loss_function=lambda logits, label: logits.sum() * 0.0)
    batch = _batch(24)
    trainer.network.train()
    trainer.discriminator.train()
    before = _generated_loss(trainer, batch)
    trainer.run()
    assert _generated_loss(trainer, batch) > before + 1e-3


def test_without_the_reversal_the_segmenter_would_descend():
    """The counter-check: a negative adversarial weight turns the ascent into a descent."""
    trainer = _trainer(
        seg_lr=1e-2, disc_lr=0.0, n=24, adversarial_weight=-1.0, loss_function=lambda logits, label: logits.sum() * 0.0
    )
    batch = _batch(24)
    trainer.network.train()
    trainer.discriminator.train()
    before = _generated_loss(trainer, batch)
    trainer.run()
    assert _generated_loss(trainer, batch) < before - 1e-3


def test_discriminator_patches_must_fit_the_training_images():
    trainer = _trainer()
    trainer.data_loader = [_batch(size=20)]
    with pytest.raises(ValueError, match="discriminator_patch_size"):
        trainer.run()


def test_the_three_updates_go_through_one_gradient_scaler():
    """With amp, Ls and La both step the segmenter's optimiser: the scaler is updated in between."""
    from ignite.engine import Events

    trainer = _trainer(amp=True)

    @trainer.on(Events.ITERATION_STARTED)
    def _cpu_scaler(engine):  # a CPU scaler stands in for the CUDA one amp=True creates on a GPU
        engine.scaler = torch.amp.GradScaler("cpu")

    trainer.run()
    assert trainer.state.output["adversarial_loss"].isfinite()


def test_la_ascends_with_its_own_optimiser_when_given_one():
    """Moeskops et al. 2017, section 3.1: learning rates per loss; La is a discriminator-loss update."""
    log = []
    trainer = _trainer(n=6, log=log)
    adversarial = torch.optim.SGD(trainer.network.parameters(), lr=1e-2)
    adversarial.step = lambda closure=None: log.append("adversarial.step")
    trainer.adversarial_optimizer = adversarial
    trainer.run()
    assert log[-3:] == [("generated", 2), "adversarial.step", "discriminator.step"]
    assert log.count("segmenter.step") == 1  # Ls only
