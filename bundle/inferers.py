"""Inference pieces MONAI lacks: slice inference over an input that may hold no slice at all."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SliceInferer

__all__ = ["ForegroundSliceInferer"]


class ForegroundSliceInferer(SliceInferer):
    """``SliceInferer`` for input cropped to its foreground (``bundle.transforms.CropForegroundToGridd``).

    A case with no foreground at all is cropped to an empty image: its prediction is an empty array of
    ``out_channels`` maps, with no network call, which ``Invertd`` pads back into an all-background map.

    Args:
        out_channels: channels of the network's output (one per region).
        args, kwargs: as ``monai.inferers.SliceInferer``.
    """

    def __init__(self, out_channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_channels = int(out_channels)

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if 0 in inputs.shape[2:]:
            return torch.zeros((inputs.shape[0], self.out_channels, *inputs.shape[2:]), device=inputs.device)
        return super().__call__(inputs, network, *args, **kwargs)
