"""Intensity normalisation that does not depend on the field of view (SegAN paper section 3, footnote 1).

The network sees each voxel's intensity relative to the statistics of the head it belongs to. Those
statistics must be the same whether the pipeline holds the whole volume (inference) or the paper's
180x180x128 centre crop (training): :func:`head_mask` finds the head the same way in every pipeline, and the
configs normalise the whole loaded volume before any crop.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

__all__ = ["ForegroundNormalized", "MaskOutsideHeadd", "head_mask", "outside_head", "NORMALIZATION_MODES"]

#: Intensity normalisations of :class:`ForegroundNormalized`.
NORMALIZATION_MODES = ("zscore", "percentile")


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D array: the cut that maximises the between-class variance of its histogram."""
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(counts * centers) / np.maximum(weight_low, 1)
    mean_high = ((counts * centers).sum() - np.cumsum(counts * centers)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][np.argmax(between)])


def head_mask(image: np.ndarray) -> np.ndarray:
    """The head (or skull-stripped brain) of a multi-channel volume (C, H, W, D), as a boolean (H, W, D) mask.

    A voxel is foreground when any channel is above that channel's Otsu threshold on log intensities (the
    log separates the air's noise floor from tissue by orders of magnitude; the histogram is cut at its
    99.9th percentile so a few hot voxels do not move it); the largest 3D connected component is kept and
    each axial slice's holes are filled (dark skull and CSF). Exact zeros, as outside a skull-stripped BraTS
    brain, are never foreground. A volume with no such structure gives its non-zero voxels.
    """
    mask = np.zeros(image.shape[1:], dtype=bool)
    for channel in image:
        nonzero = channel != 0
        values = channel[nonzero]
        if values.size == 0 or values.min() == values.max():
            continue
        log = np.log1p(np.maximum(channel - values.min(), 0))
        cut = log[nonzero]
        mask |= nonzero & (log > _otsu_threshold(np.minimum(cut, np.percentile(cut, 99.9))))
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == np.argmax(sizes)
    # in-plane holes: background pieces of an axial slice that do not reach the slice's border
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    pieces, _ = ndimage.label(~mask, structure=in_plane)
    border = np.unique(
        np.concatenate([pieces[0].ravel(), pieces[-1].ravel(), pieces[:, 0].ravel(), pieces[:, -1].ravel()])
    )
    mask |= ~np.isin(pieces, border)
    return mask if mask.any() else np.any(image != 0, axis=0)


class ForegroundNormalized(MapTransform):
    """Normalise each channel with statistics of the head only, and set everything outside the head to 0.

    Replaces ``NormalizeIntensityd(nonzero=True)``, whose statistics include every non-zero voxel of the
    field of view it is given: on scans whose air is noise rather than exact zeros, the training crop and
    the whole volume then give the same voxel different values, and a model that scores well on the crop
    fails on the volume. Here the statistics come from :func:`head_mask` of the volume, and the pipelines
    normalise the whole loaded volume before any crop, so training, validation and inference agree.

    Args:
        keys: the channel-first image key(s).
        mode: ``"zscore"`` (zero mean, unit standard deviation inside the head) or ``"percentile"`` (the
            ``lower``-th .. ``upper``-th percentiles inside the head mapped to [0, 1] and clipped: the value range
            normalisation of the SegAN paper's footnote 1).
        lower, upper: the percentiles of ``"percentile"`` mode.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "zscore",
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_MODES}, got {mode!r}.")
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles need 0 <= lower < upper <= 100, got {lower} and {upper}.")
        self.mode, self.lower, self.upper = mode, float(lower), float(upper)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """The normalised (C, H, W, D) float32 array of ``image``."""
        image = np.asarray(image, dtype=np.float32)
        mask = head_mask(image)
        out = np.zeros_like(image)
        for c, channel in enumerate(image):
            inside = channel[mask]
            if inside.size == 0:
                continue
            if self.mode == "zscore":
                scale = float(inside.std())
                values = (inside - float(inside.mean())) / (scale if scale > 0 else 1.0)
            else:
                low, high = np.percentile(inside, [self.lower, self.upper])
                values = np.clip((inside - low) / (high - low if high > low else 1.0), 0.0, 1.0)
            out[c][mask] = values
        return out

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            d[key] = convert_to_dst_type(self.normalize(array), image, dtype=torch.float32)[0]
        return d


def outside_head(image: torch.Tensor) -> torch.Tensor:
    """Where a normalised channel-first image (C, ...) lies outside the head: every channel exactly 0.

    :class:`ForegroundNormalized` sets everything outside :func:`head_mask` to 0, and inside the head a voxel
    is exactly 0 in every channel with probability ~0 (z-scores of continuous intensities), so the
    normalised image carries the head mask through any crop, pad or inverse the pipelines apply to it.
    Shape (1, ...), boolean.
    """
    return (image == 0).all(dim=0, keepdim=True)


class MaskOutsideHeadd(MapTransform):
    """Label nothing outside the head: zero the prediction maps wherever the normalised image is the air.

    A post-processing guard (on by default, ``head_guard``) on top of a critic input that sees every
    prediction: the head mask the normalisation computed (:func:`outside_head` of ``image_key``) is applied
    to the probability or region maps, which must share the image's spatial shape (i.e. before ``Invertd``).
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        air = outside_head(d[self.image_key])
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[1:] != air.shape[1:]:
                raise ValueError(
                    f"head guard: '{key}' has spatial shape {tuple(pred.shape[1:])} but '{self.image_key}' has "
                    f"{tuple(air.shape[1:])}; apply MaskOutsideHeadd before inverting the prediction."
                )
            d[key] = pred * ~air.to(pred.device)
        return d
