"""SegAN segmentor and critic networks (Xue et al. 2018, section 2.2 and Fig. 1).

Both are built from MONAI's ``Convolution`` blocks and parameter-free resize layers. The segmentor returns logits: apply a
sigmoid to get the paper's probability label maps (the trainer and the inference post-processing do this,
so a threshold is never applied to logits by mistake).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SegANSegmentor",
    "SegANCritic",
    "SegANCritics",
    "RegionSegmentors",
    "mask_image",
    "critic_view",
    "CLIP_PARAMS",
    "CRITIC_INPUTS",
]

#: What the critic weight clamp bounds: every parameter, or the convolutions only (BN without affine).
CLIP_PARAMS = ("all", "weights")

#: What a critic sees of an image and a label map (:func:`critic_view`).
CRITIC_INPUTS = ("masked", "masked_map", "shifted")

_LEAKY = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def _down_block(spatial_dims: int, in_channels: int, out_channels: int, norm: bool, affine: bool = True) -> Convolution:
    """Conv 4x4 stride 2 (pad 1) -> [BN] -> LeakyReLU: one encoder level, halving each spatial size.

    ``affine=False`` gives a BatchNorm without learnable scale and shift (the critic's ``clip_params="weights"``).
    """
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=2,
        kernel_size=4,
        padding=1,
        act=_LEAKY,
        norm=("batch", {"affine": affine}) if norm else None,
        bias=not norm,
    )


def _up_block(spatial_dims: int, in_channels: int, out_channels: int, mode: str, last: bool) -> nn.Sequential:
    """Resize x2 -> Conv 3x3 stride 1 [-> BN -> ReLU]: one decoder level (the last one is a bare conv)."""
    resize = nn.Upsample(scale_factor=2, mode=mode, align_corners=False if "linear" in mode else None)
    if last:
        conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, conv_only=True)
    else:
        conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, act="relu", norm="batch", bias=False)
    return nn.Sequential(resize, conv)


class SegANSegmentor(nn.Module):
    """The segmentor S: a fully convolutional encoder-decoder with U-net skips (paper Fig. 1).

    Encoder: ``len(features)`` blocks of Conv 4x4 stride 2 (the first without BatchNorm) with LeakyReLU.
    Decoder: the mirrored widths, each block a x2 resize and Conv 3x3 + BN + ReLU, then a last x2 resize and
    Conv 3x3 to one map per region. The U-net skip connections concatenate the matching encoder output
    (``skip="cat"``, the default: the paper "follows the U-net", which concatenates, and so does the
    authors' public code) or add it (``skip="add"``, a lighter variant with the same receptive field).

    Args:
        spatial_dims: 2 for the paper's slice network, 3 for whole-volume patches (4x4x4 down and 3x3x3 up blocks).
        in_channels: input channels (the paper: T1c, T2, FLAIR).
        out_channels: one label map per region (the paper's S3: whole tumour, core, enhancing).
        features: encoder widths; the paper's grid search picked 4 levels of 64, 128, 256, 512.
        upsample: interpolation of the resize layers, ``"bilinear"`` or ``"nearest"`` (``"bilinear"`` is
            trilinear when ``spatial_dims`` is 3).
        skip: ``"cat"`` (paper) or ``"add"``.
        gradient_checkpointing: in training, keep only each block's input for the backward pass and recompute
            the block then (``torch.utils.checkpoint``): about one more forward pass of compute for the
            activation memory of the resized decoder maps, which dominate a 3D segmentor's memory
            (``docs/performance.md``). BatchNorm running statistics are updated again by the recomputation.
            Evaluation, TorchScript and ONNX are unaffected, and the parameters are the same.

    Returns logits of shape (B, out_channels, H, W) (and D in 3D); every spatial size must be a multiple of
    ``2 ** len(features)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        features: Sequence[int] = (64, 128, 256, 512),
        upsample: str = "bilinear",
        skip: str = "cat",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if skip not in ("add", "cat"):
            raise ValueError(f"skip must be 'add' or 'cat', got {skip!r}.")
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels, got {list(features)}.")
        if upsample == "bilinear" and spatial_dims == 3:
            upsample = "trilinear"
        self.skip = skip
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.factor = 2 ** len(features)
        widths = [in_channels, *features]
        self.encoder = nn.ModuleList(
            _down_block(spatial_dims, widths[i], widths[i + 1], norm=i > 0) for i in range(len(features))
        )
        self.decoder = nn.ModuleList()
        for level in range(len(features) - 1, 0, -1):
            # decoder input: the deeper output, concatenated with its skip when skip == "cat"
            width_in = features[level] * (2 if skip == "cat" and level < len(features) - 1 else 1)
            self.decoder.append(_up_block(spatial_dims, width_in, features[level - 1], upsample, last=False))
        width_in = features[0] * (2 if skip == "cat" else 1)
        self.head = _up_block(spatial_dims, width_in, out_channels, upsample, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for size in x.shape[2:]:
            if size % self.factor != 0:  # written as a loop so the network stays TorchScript-able
                raise ValueError(
                    f"SegANSegmentor needs spatial sizes that are multiples of {self.factor}, got {x.shape[2:]}: "
                    "crop or pad the input (e.g. DivisiblePad(k=16) or a 160x160 crop)."
                )
        if self.gradient_checkpointing and self.training and not torch.jit.is_scripting():
            return self._checkpointed_forward(x)
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck has no partner
        for block in self.decoder:
            x = block(x)
            x = self._merge(x, skips.pop())
        return self.head(x)

    def _merge(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip if self.skip == "add" else torch.cat([x, skip], dim=1)

    @torch.jit.unused
    def _checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with every block recomputed in the backward pass instead of keeping its activations."""
        skips = []
        for block in self.encoder:
            x = checkpoint(block, x, use_reentrant=False)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = self._merge(checkpoint(block, x, use_reentrant=False), skips.pop())
        return checkpoint(self.head, x, use_reentrant=False)


class SegANCritic(nn.Module):
    """One critic C: the segmentor's encoder with ``len(features)`` down blocks (paper Fig. 1).

    ``forward`` returns the hierarchical features the multi-scale L1 loss compares: the (masked) input
    itself as layer 0, then the output of every block, flattened per sample to (B, -1).

    ``affine_norm=False`` drops BatchNorm's learnable scale and shift, so that clamping every parameter
    clamps only convolution weights and biases (``clip_params="weights"``, see :class:`SegANCritics`).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        features: Sequence[int] = (64, 128, 256),
        affine_norm: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_channels, *features]
        self.blocks = nn.ModuleList(
            _down_block(spatial_dims, widths[i], widths[i + 1], norm=i > 0, affine=affine_norm)
            for i in range(len(features))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x.flatten(1)]
        for block in self.blocks:
            x = block(x)
            feats.append(x.flatten(1))
        return feats


def mask_image(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``x o y`` of equation (2): every image channel multiplied pixel-wise by every label map.

    image (B, C, ...) and maps (B, R, ...) give (B, R, C, ...): the C-channel masked image of each region.
    """
    return image.unsqueeze(1) * maps.unsqueeze(2)


def critic_view(image: torch.Tensor, maps: torch.Tensor, mode: str = "masked") -> torch.Tensor:
    """What the critics see of ``image`` (B, C, ...) and label maps ``maps`` (B, R, ...): (B, R, C', ...).

    * ``"masked"``: ``x o y``, the paper's literal input (equation 2). Wherever every channel of ``x`` is 0
      (the air the intensity normalisation zeroes, or a head voxel at the mean intensity) the product is 0
      whatever ``y`` is, so the loss has no gradient with respect to the prediction there and nothing
      trains the segmentor's output in the air;
    * ``"masked_map"``: ``x o y`` with the map ``y`` itself as one more channel (C' = C + 1): the critic sees
      every prediction, inside and outside the head;
    * ``"shifted"``: ``(x - min x + 1) o y``, the image shifted per sample and channel so that its smallest
      value is 1: no voxel is 0, so every prediction reaches the critic, weighted by a positive intensity.
    """
    if mode == "masked":
        return mask_image(image, maps)
    if mode == "masked_map":
        return torch.cat([mask_image(image, maps), maps.unsqueeze(2).to(image.dtype)], dim=2)
    if mode == "shifted":
        low = image.detach().flatten(2).amin(dim=2).view(*image.shape[:2], *([1] * (image.dim() - 2)))
        return mask_image(image - low + 1.0, maps)
    raise ValueError(f"critic_input must be one of {CRITIC_INPUTS}, got {mode!r}.")


class SegANCritics(nn.Module):
    """The critics of a multi-region SegAN (paper section 3.1).

    ``mode="per_region"`` is S3-3C, the paper's chosen model: one critic per region map, each seeing the
    image masked by its region. ``mode="joint"`` is S3-1C: one critic whose input is the masked images of
    all regions concatenated on channels. With one region both are the single-label SegAN (S1-1C).

    ``forward(image, maps)`` returns one feature list per critic. ``input_mode`` says what a critic sees
    (:func:`critic_view`): ``"masked"`` is the paper's ``x o y``; ``"masked_map"`` adds the map as a channel
    and ``"shifted"`` masks a shifted image, so that a prediction made where the image is 0 reaches the loss.

    ``clip_params`` says which parameters the weight clamp of section 2.3 bounds (:meth:`clamp_`):

    * ``"all"``: every parameter, BatchNorm scale and shift included (the literal reading, and the authors'
      public code). A clamped BN scale and shift bound each BN output near ``|gamma| + |beta|`` (about
      0.02), so the deeper layers carry only a few percent of the multi-scale loss;
    * ``"weights"``: the convolution weights and biases only; the critic's BatchNorm layers then have no
      learnable scale and shift (they normalise to unit variance, which keeps the critic bounded without
      flattening its features).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_regions: int = 3,
        features: Sequence[int] = (64, 128, 256),
        mode: str = "per_region",
        clip_params: str = "weights",
        input_mode: str = "masked",
    ) -> None:
        super().__init__()
        if input_mode not in CRITIC_INPUTS:
            raise ValueError(f"critic_input must be one of {CRITIC_INPUTS}, got {input_mode!r}.")
        if mode not in ("per_region", "joint"):
            raise ValueError(f"critic mode must be 'per_region' (S3-3C) or 'joint' (S3-1C), got {mode!r}.")
        if clip_params not in CLIP_PARAMS:
            raise ValueError(f"clip_params must be one of {CLIP_PARAMS}, got {clip_params!r}.")
        self.mode = mode
        self.num_regions = num_regions
        self.clip_params = clip_params
        self.input_mode = input_mode
        in_channels = in_channels + (1 if input_mode == "masked_map" else 0)
        affine = clip_params == "all"
        if mode == "per_region":
            self.critics = nn.ModuleList(
                SegANCritic(spatial_dims, in_channels, features, affine) for _ in range(num_regions)
            )
        else:
            self.critics = nn.ModuleList([SegANCritic(spatial_dims, in_channels * num_regions, features, affine)])

    def forward(self, image: torch.Tensor, maps: torch.Tensor) -> list[list[torch.Tensor]]:
        if maps.shape[1] != self.num_regions:
            raise ValueError(f"the critics expect {self.num_regions} label maps, got {maps.shape[1]}.")
        masked = critic_view(image, maps, self.input_mode)
        if self.mode == "joint":
            return [self.critics[0](masked.flatten(1, 2))]
        return [critic(masked[:, r]) for r, critic in enumerate(self.critics)]

    def clamp_(self, clip: float) -> None:
        """Clamp every critic parameter to [-clip, clip] (paper section 2.3, after WGAN); with
        ``clip_params="weights"`` these are the convolution weights and biases only."""
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(-clip, clip)


class RegionSegmentors(nn.Module):
    """S1-1C of the paper (section 3.1): one single-map SegAN segmentor per region, side by side.

    Region ``r``'s map comes from its own ``SegANSegmentor`` with one output channel, which shares no
    parameter (BatchNorm statistics included) with the others; the maps are concatenated on channels so the
    module is a drop-in ``network_def`` (B, R, H, W logits). With ``SegANCritics(mode="per_region")`` each
    segmentor has its own critic and the averaged multi-scale loss reaches segmentor ``r`` only through
    critic ``r``: training them in one run is training R independent SegANs on the same batches.

    Args: as ``SegANSegmentor``; ``out_channels`` is the number of regions (one segmentor each).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        features: Sequence[int] = (64, 128, 256, 512),
        upsample: str = "bilinear",
        skip: str = "cat",
    ) -> None:
        super().__init__()
        self.segmentors = nn.ModuleList(
            SegANSegmentor(spatial_dims, in_channels, 1, features, upsample, skip) for _ in range(out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([segmentor(x) for segmentor in self.segmentors], dim=1)
