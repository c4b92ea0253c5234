"""Moeskops et al. 2017, *Adversarial training and dilated convolutions for brain MRI segmentation*:
its two segmentation networks and classic discriminator (section 2.2 and Fig. 1), and ``MoeskopsTrainer``, the
three alternating updates of section 2.3 (a sibling of ``bundle.engines.SegANTrainer`` on the same
``AlternatingTrainer`` base).

Both segmentation networks output logits over ``num_classes`` mutually exclusive classes, background
included: a softmax over channels gives the paper's class probabilities and an argmax the label map. They
use no subsampling, so an output pixel sees exactly its receptive field (``receptive_field``). The paper
trains them with valid convolutions on patches (51x51 -> 21x21 for the FCN); here every 3x3 convolution
is zero-padded so a whole slice maps to a map of the same size, with the same receptive field inside it.

Every layer has BatchNorm and ReLU, and dropout acts on the input of every 1x1 (and fully connected)
layer. Convolutions keep their bias so the trainable weights and biases count exactly as in the paper
(140,039 and 56,039 for C = 7 on one input channel, BatchNorm not counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Convolution
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from .engines import ADVERSARIAL_LOSS, AlternatingTrainer, _unwrap

__all__ = ["MoeskopsFCN", "MoeskopsDilatedNet", "MoeskopsDiscriminator", "MoeskopsTrainer", "DISCRIMINATOR_LOSS"]

#: Engine output key of the discriminator's loss on manual segmentations (Ld).
DISCRIMINATOR_LOSS = "discriminator_loss"

#: Dilations of the dilated network's 3x3 layers (Yu and Koltun's context module, paper Fig. 1).
DILATIONS = (1, 1, 2, 4, 8, 16, 1)


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, padding: int | None = None):
    """Conv -> BN -> ReLU; ``padding=None`` keeps the spatial size ("same"), 0 makes it a valid convolution."""
    return Convolution(
        2,
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        dilation=dilation,
        padding=padding,
        act="relu",
        norm="batch",
    )


def _head(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout -> 1x1 conv to one logit per class (the output layer: no BN, no activation)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Conv2d(in_channels, num_classes, kernel_size=1))


class MoeskopsFCN(nn.Module):
    """The fully convolutional network: 15 layers of 32 3x3 kernels, a 1x1 layer of 256, a 1x1 layer of C.

    Receptive field 31x31 (``1 + 2 * 15``).

    Args:
        in_channels: image channels (the paper: one T1-weighted image).
        num_classes: C, the mutually exclusive classes including background.
        features: kernels of each 3x3 layer (32).
        layers: number of 3x3 layers (15).
        hidden: kernels of the first 1x1 layer (256).
        dropout: dropout probability on the input of each 1x1 layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 7,
        features: int = 32,
        layers: int = 15,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [features] * layers
        convs = [_conv(widths[i], widths[i + 1]) for i in range(layers)]
        self.features = nn.Sequential(*convs, nn.Dropout(dropout), _conv(features, hidden, kernel_size=1))
        self.head = _head(hidden, num_classes, dropout)
        self.receptive_field = 1 + 2 * layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MoeskopsDilatedNet(nn.Module):
    """The dilated network: 3x3 layers of 32 kernels with dilations 1, 1, 2, 4, 8, 16, 1, then a 1x1 layer of C.

    Receptive field 67x67 (``1 + 2 * sum(dilations)``) from 7 convolutions, without subsampling.

    Args:
        in_channels: image channels.
        num_classes: C, the mutually exclusive classes including background.
        features: kernels of each 3x3 layer (32).
        dilations: dilation of each 3x3 layer.
        dropout: dropout probability on the input of the 1x1 layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 7,
        features: int = 32,
        dilations: tuple[int, ...] | list[int] = DILATIONS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [features] * len(dilations)
        self.features = nn.Sequential(*(_conv(widths[i], widths[i + 1], dilation=d) for i, d in enumerate(dilations)))
        self.head = _head(features, num_classes, dropout)
        self.receptive_field = 1 + 2 * sum(int(d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MoeskopsDiscriminator(nn.Module):
    """The discriminator: manual or generated, for an image patch and its segmentation (paper section 2.2).

    The image patch goes through two 3x3 layers; their output is concatenated with the segmentation (one-hot
    manual, or the softmax of the segmentation network), then three 3x3 layers of 32, a 3x3 max-pool, two
    3x3 layers of 32, a fully connected layer of 256 and two outputs (logits of ``GENERATED``, ``MANUAL``).
    All convolutions are valid, as in the paper: the 25x25 image patch shrinks to the 21x21 of the
    segmentation it is concatenated with, and the 21x21 input ends at 1x1 before the fully connected layer.

    ``forward(image, segmentation)`` takes image patches of ``patch_size + 2 * image_margin`` pixels and
    segmentation patches of ``patch_size`` pixels with the same centre.

    Args:
        in_channels: image channels.
        num_classes: channels of the segmentation (C).
        patch_size: side of the segmentation patch (21, the segmentation network's training output).
        features: kernels of every 3x3 layer (32).
        hidden: nodes of the fully connected layer (256).
        dropout: dropout probability on the input of each fully connected layer.
    """

    #: Output index of each verdict.
    GENERATED, MANUAL = 0, 1

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 7,
        patch_size: int = 21,
        features: int = 32,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.image_margin = 2  # two valid 3x3 layers on the image before the concatenation
        side = (patch_size - 6) // 3 - 4  # three valid 3x3, 3x3 max-pool (stride 3), two valid 3x3
        if side < 1:
            raise ValueError(f"discriminator patch_size {patch_size} is too small: the layers need at least 21.")
        self.image_path = nn.Sequential(_conv(in_channels, features, padding=0), _conv(features, features, padding=0))
        self.joint_path = nn.Sequential(
            _conv(features + num_classes, features, padding=0),
            _conv(features, features, padding=0),
            _conv(features, features, padding=0),
            nn.MaxPool2d(3),
            _conv(features, features, padding=0),
            _conv(features, features, padding=0),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(features * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        if segmentation.shape[1] != self.num_classes or tuple(segmentation.shape[2:]) != (self.patch_size,) * 2:
            raise ValueError(
                f"the discriminator takes {self.num_classes}-class segmentation patches of {self.patch_size}x"
                f"{self.patch_size}, got shape {tuple(segmentation.shape)}."
            )
        x = torch.cat([self.image_path(image), segmentation.to(image.dtype)], dim=1)
        return self.classifier(self.joint_path(x))


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is multiplied by ``-weight`` (gradient reversal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


class MoeskopsTrainer(AlternatingTrainer):
    """A segmentation network trained against a classic discriminator (Moeskops et al. 2017, section 2.3).

    Each iteration performs the paper's three updates in turn, each on its own third of the batch (the
    paper splits minibatches of 300 into 3 x 100; a batch of fewer than 3 is used whole by each):

    1. **Ls**: the segmentation network descends the cross-entropy of its softmax against the one-hot
       manual segmentation (``optimizer``);
    2. **Ld**: the discriminator descends its loss on manual segmentations, i.e. learns to call (image patch,
       one-hot manual patch) pairs ``MANUAL`` (``discriminator_optimizer``);
    3. **La**: the whole network is updated on the discriminator's loss with the image as input: the
       discriminator descends it, learning to call (image patch, softmax patch) pairs ``GENERATED``, and the
       segmentation network *ascends* it through a gradient reversal (scaled by ``adversarial_weight``),
       so that its segmentations look manual to the discriminator.

    Segmentation and discriminator updates use separate optimisers with separate learning rates (the
    paper, section 3.1: RMSProp, 1e-3 for the segmentation loss and 1e-5 for the discriminator loss). La is a
    discriminator-loss update of the whole network (section 2.3), so the segmentation network ascends it with
    ``adversarial_optimizer``, its own optimiser at the discriminator-loss rate; without one it ascends La
    with ``optimizer`` (at the segmentation-loss rate, 100 times the paper's reading). The discriminator sees
    ``patches_per_image`` random patches of each
    image and segmentation (``discriminator.patch_size`` pixels, the image patch ``image_margin`` wider on
    each side), so the segmentation network can train on whole slices.

    The engine output holds ``image``, ``label``, ``pred`` (the Ls third's class probabilities), ``loss``
    (Ls), ``discriminator_loss`` (Ld) and ``adversarial_loss`` (La); the iteration events fire for the Ls
    update as in ``SupervisedTrainer``, and model completed after all three.

    Args:
        device: where the networks run.
        max_epochs: epochs to train.
        train_data_loader: yields ``image`` (B, channels, H, W) and one-hot ``label`` (B, C, H, W).
        network: the segmentation network (returns logits over C classes).
        discriminator: ``MoeskopsDiscriminator`` (possibly wrapped in ``DistributedDataParallel``).
        optimizer: the segmentation network's optimiser for Ls (and for the La ascent when
            ``adversarial_optimizer`` is None).
        discriminator_optimizer: the discriminator's optimiser (Ld and the La descent).
        adversarial_optimizer: the segmentation network's optimiser for the La ascent (Moeskops et al. 2017,
            section 3.1: the discriminator-loss rate); None: ``optimizer``.
        loss_function: the segmentation loss; default ``torch.nn.CrossEntropyLoss()`` (one-hot targets).
        adversarial_weight: scale of the reversed gradient reaching the segmentation network in La (1 = the paper).
        patches_per_image: discriminator patches drawn from each image of the Ld and La thirds.
        other arguments: as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        discriminator: torch.nn.Module,
        optimizer: Optimizer,
        discriminator_optimizer: Optimizer,
        loss_function: Callable | None = None,
        adversarial_weight: float = 1.0,
        patches_per_image: int = 1,
        adversarial_optimizer: Optimizer | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if patches_per_image < 1:
            raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}.")
        super().__init__(device, max_epochs, train_data_loader, **trainer_kwargs)
        self.network = network
        self.discriminator = discriminator
        self.optimizer = optimizer
        self.discriminator_optimizer = discriminator_optimizer
        self.adversarial_optimizer = optimizer if adversarial_optimizer is None else adversarial_optimizer
        self.loss_function = torch.nn.CrossEntropyLoss() if loss_function is None else loss_function
        self.verdict_loss = torch.nn.CrossEntropyLoss()
        self.adversarial_weight = adversarial_weight
        self.patches_per_image = patches_per_image

    def _patches(self, image: torch.Tensor, segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``patches_per_image`` random (image, segmentation) patch pairs of each image, as the discriminator takes them."""
        disc = _unwrap(self.discriminator)
        size, margin = disc.patch_size, disc.image_margin
        side = size + 2 * margin
        height, width = image.shape[-2:]
        if height < side or width < side:
            raise ValueError(
                f"training images of {height}x{width} are smaller than the discriminator's {side}x{side} image "
                "patch: lower `discriminator_patch_size` or train on larger patches."
            )
        n = self.patches_per_image
        tops = torch.randint(0, height - side + 1, (image.shape[0], n)).tolist()
        lefts = torch.randint(0, width - side + 1, (image.shape[0], n)).tolist()
        images, segs = [], []
        for b in range(image.shape[0]):
            for y, x in zip(tops[b], lefts[b]):
                images.append(image[b, :, y : y + side, x : x + side])
                segs.append(segmentation[b, :, y + margin : y + margin + size, x + margin : x + margin + size])
        return torch.stack(images), torch.stack(segs)

    def _verdict_loss(self, image: torch.Tensor, segmentation: torch.Tensor, verdict: int) -> torch.Tensor:
        """The discriminator's cross-entropy for calling every patch pair ``verdict``."""
        logits = self.discriminator(*self._patches(image, segmentation))
        return self.verdict_loss(logits.float(), torch.full((logits.shape[0],), verdict, device=logits.device))

    def _iteration(self, engine: MoeskopsTrainer, batchdata: dict[str, Any]) -> dict:
        image, label = engine._prepare(batchdata)
        thirds = torch.arange(image.shape[0]).tensor_split(3) if image.shape[0] >= 3 else [slice(None)] * 3
        (seg_image, seg_label), (man_image, man_label), (adv_image, _) = ((image[i], label[i]) for i in thirds)
        engine.network.train()
        engine.discriminator.train()
        disc = _unwrap(engine.discriminator)

        # Ls: the segmentation network descends the cross-entropy
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            logits = engine.network(seg_image)
            loss = engine.loss_function(logits.float(), seg_label.float())
        engine.state.output = {
            Keys.IMAGE: seg_image,
            Keys.LABEL: seg_label,
            Keys.PRED: torch.softmax(logits.detach().float(), 1),
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine._backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss.detach()  # logged as a number: the graph is spent
        engine._update(engine.optimizer)
        engine._end_updates()  # a gradient scaler steps each optimiser at most once per update()

        # Ld: the discriminator learns to call manual segmentations MANUAL
        engine.discriminator_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            discriminator_loss = engine._verdict_loss(man_image, man_label, disc.MANUAL)
        engine._backward(discriminator_loss)
        engine._update(engine.discriminator_optimizer)
        engine._end_updates()

        # La: the discriminator descends its loss on generated segmentations, the segmenter ascends it
        engine.adversarial_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        engine.discriminator_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            generated = torch.softmax(engine.network(adv_image).float(), 1)
            reversed_generated = _ReverseGradient.apply(generated, engine.adversarial_weight)
            adversarial = engine._verdict_loss(adv_image, reversed_generated, disc.GENERATED)
        engine._backward(adversarial)
        engine._update(engine.adversarial_optimizer)
        engine._update(engine.discriminator_optimizer)
        engine._end_updates()

        engine.state.output[DISCRIMINATOR_LOSS] = discriminator_loss.detach()
        engine.state.output[ADVERSARIAL_LOSS] = adversarial.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
