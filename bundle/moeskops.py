"""The networks of Moeskops et al. 2017, *Adversarial training and dilated convolutions for brain MRI
segmentation* (seed 002, section 2.2 and Fig. 1): two segmentation networks and a classic discriminator.

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

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["MoeskopsFCN", "MoeskopsDilatedNet", "MoeskopsDiscriminator"]

#: Dilations of the dilated network's 3x3 layers (Yu and Koltun's context module, paper Fig. 1).
DILATIONS = (1, 1, 2, 4, 8, 16, 1)


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, padding: int | None = None):
    """Conv -> BN -> ReLU; ``padding=None`` keeps the spatial size ("same"), 0 makes it a valid convolution."""
    return Convolution(
        2, in_channels, out_channels, kernel_size=kernel_size, dilation=dilation, padding=padding, act="relu", norm="batch"
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
