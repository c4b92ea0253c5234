"""What the 3D SegAN recipe (``configs/variants/segan3d.json``) needs beyond MONAI: sliding-window inference over
an input that may hold no voxel at all, as :class:`bundle.inferers.ForegroundSliceInferer` does for slices.

The 3D networks are ``bundle.networks.SegANSegmentor`` and ``SegANCritics`` with ``spatial_dims`` 3; patches are
drawn by MONAI's ``RandCropByPosNegLabeld`` and whole volumes segmented by MONAI's ``SlidingWindowInferer``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

__all__ = ["ForegroundSlidingWindowInferer"]


class ForegroundSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` for input cropped to its foreground (``bundle.transforms.CropForegroundToGridd``).

    A case with no foreground is cropped to an empty image: its prediction is an empty array of ``out_channels``
    maps, with no network call, which ``Invertd`` pads back into an all-background map. Any other input is
    segmented window by window (``roi_size`` windows, each a multiple of the segmentor's ``2 ** levels``; an
    input smaller than a window is padded with zeros, the value of air after normalisation).

    Args:
        out_channels: channels of the network's output (one per region).
        args, kwargs: as ``monai.inferers.SlidingWindowInferer`` (``roi_size``, ``sw_batch_size``, ``overlap``,
            ``mode`` ``"gaussian"`` or ``"constant"`` blending, ...).
    """

    def __init__(self, out_channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_channels = int(out_channels)

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if 0 in inputs.shape[2:]:
            return torch.zeros((inputs.shape[0], self.out_channels, *inputs.shape[2:]), device=inputs.device)
        return super().__call__(inputs, network, *args, **kwargs)


def saved_activation_bytes(
    roi_size=(32, 32, 32),
    features=(64, 128, 256, 512),
    critic_features=(64, 128, 256),
    in_channels: int = 3,
    regions: int = 3,
    batch: int = 1,
    amp_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, int]:
    """Bytes the 3D S3-3C iteration keeps for its backward passes, measured on the CPU with saved-tensor hooks.

    ``segmentor``: the segmentor's forward, kept through both steps of the iteration; ``critic_step``: the
    critics on the prediction and on the label (the critic step's backward); ``segmentor_step``: the critics on
    the prediction only (the label's pass runs without gradient). Every tensor is counted once; sizes scale with
    ``batch`` times the voxels of ``roi_size`` (each feature map is a fixed fraction of the patch), so a small
    ``roi_size`` measured here gives the 128^3 figure by that ratio (``docs/performance.md``).
    ``amp_dtype``: the autocast dtype (``torch.bfloat16`` as the GPU recipe), ``None`` for float32.
    """
    from .networks import SegANCritics, SegANSegmentor

    segmentor = SegANSegmentor(3, in_channels, regions, features, gradient_checkpointing=gradient_checkpointing)
    critics = SegANCritics(3, in_channels, regions, critic_features)
    image = torch.randn(batch, in_channels, *roi_size)
    label = (torch.rand(batch, regions, *roi_size) > 0.5).float()
    autocast = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else torch.autocast("cpu", enabled=False)

    def measure(fn) -> int:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return int(sum(seen.values()))

    results: dict[str, int] = {}
    with autocast:
        results["segmentor"] = measure(lambda: results.setdefault("_pred", torch.sigmoid(segmentor(image).float())))
        pred = results.pop("_pred").detach()
        results["critic_step"] = measure(lambda: (critics(image, pred), critics(image, label)))
        results["segmentor_step"] = measure(lambda: critics(image, pred.requires_grad_(True)))
    return results
