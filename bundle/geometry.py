"""The canonical frame a case is sliced in, whatever way it was stored (clinical inputs).

SegAN runs a 2D network on axial slices (Xue et al. 2018, section 3) of BraTS volumes, which are stored with
the inferior-superior axis third and 1 mm voxels. A clinical scan may be stored as LPS, sagittal or coronal
slices, with 0.5 mm pixels or 3 mm slices. :class:`CanonicalFramed` brings every case into one frame before
slicing: MONAI's ``Orientation`` to fixed axis codes whose third axis is I-S (``RAS`` by default, as MONAI's
model-zoo ``brats_mri_segmentation`` bundle does), then MONAI's ``Spacing`` to the training in-plane voxel size,
keeping the slice spacing (a 2D network never mixes slices). Each step is skipped when the case already has
that orientation or spacing, so BraTS-like data pays nothing; both are inverted by ``Invertd`` (nearest
neighbour for label maps), so predictions come back on the input's own grid. The configs apply it right after
loading, before the intensity normalisation, whose head mask fills holes slice by slice along the third axis.

Modalities stored on different grids are brought onto one reference modality when a case is loaded
(:class:`bundle.loading.LoadCaseImaged`); this module only canonicalises a case already on one grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Orientation, Spacing
from monai.utils import TraceKeys, ensure_tuple_rep

__all__ = ["CanonicalFramed", "check_orientation", "voxel_sizes", "without_rounding_noise"]

_AXIS_PAIRS = ("LR", "AP", "IS")


def check_orientation(axcodes) -> str | None:
    """``None`` if ``axcodes`` are three axis codes (one of L/R, one of A/P, one of I/S, nibabel's convention)
    whose third is I or S, so that slices along the third axis are axial; else what is accepted."""
    accepted = "three axis codes, one each of L/R, A/P and I/S, the last I or S (axial slices), e.g. 'RAS' or 'LPS'"
    if not isinstance(axcodes, str) or len(axcodes) != 3:
        return accepted
    codes = axcodes.upper()
    if sorted(next(i for i, pair in enumerate(_AXIS_PAIRS) if c in pair) for c in codes if c in "LRAPIS") != [0, 1, 2]:
        return accepted
    return None if codes[2] in "IS" else accepted


def voxel_sizes(affine) -> np.ndarray:
    """Voxel size along each spatial axis of an image with this (spatial rank + 1) square affine."""
    affine = np.asarray(affine, dtype=float)
    return np.sqrt((affine[:-1, :-1] ** 2).sum(0))


def without_rounding_noise(image: torch.Tensor, relative: float = 1e-6) -> torch.Tensor:
    """``image`` with values below ``relative`` times its largest magnitude set to exactly 0.

    Interpolating at a grid point that coincides with a source voxel weighs its neighbours ~1e-16, not 0, so
    the exact-zero air around a skull-stripped brain picks up values ~1e-12 from the brain next to it; the head
    mask of the intensity normalisation (:func:`bundle.intensity.head_mask`) counts every nonzero voxel, and
    such values would move it. Float32 resolves no value that small next to the image's largest one anyway.
    """
    scale = float(image.abs().max()) if image.numel() else 0.0
    return torch.where(image.abs() < relative * scale, torch.zeros_like(image), image) if scale else image


class CanonicalFramed(MapTransform, InvertibleTransform):
    """Reorient a case to ``axcodes`` and resample its in-plane voxels to ``pixdim``; a no-op when already so.

    Args:
        keys: the channel-first keys of one case, on one grid (e.g. ``["image", "label"]``).
        axcodes: the orientation to bring the case to (nibabel axis codes: ``RAS`` means the first axis points
            to the right, the third superior). The third must be I or S, so slices along it are axial.
        pixdim: the in-plane voxel size (mm) of the first two axes after reorientation; the slice spacing is
            kept. ``None`` keeps the input's voxel size.
        mode: interpolation per key (``bilinear`` for images, ``nearest`` for label maps).
        tolerance: relative difference of voxel size below which a case counts as already at ``pixdim``
            (floating-point noise in a header must not cost a resampling).
    """

    def __init__(
        self,
        keys: KeysCollection,
        axcodes: str = "RAS",
        pixdim: Sequence[float] | None = (1.0, 1.0),
        mode: Sequence[str] | str = "bilinear",
        tolerance: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        wrong = check_orientation(axcodes)
        if wrong:
            raise ValueError(f"`orientation` is {axcodes!r}; it must be {wrong}. Fix --orientation.")
        self.axcodes = axcodes.upper()
        if pixdim is not None:
            pixdim = [float(p) for p in pixdim]
            if len(pixdim) != 2 or not all(p > 0 for p in pixdim):
                raise ValueError(
                    f"`pixdim` is {pixdim!r}; it must be two positive in-plane voxel sizes in mm, e.g. [1.0, 1.0] "
                    "(the slice spacing is kept). Fix --pixdim."
                )
        self.pixdim = pixdim
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.tolerance = float(tolerance)
        self.orientation = Orientation(axcodes=self.axcodes, labels=tuple(zip("LPI", "RAS")))  # nibabel's codes
        # a non-positive pixdim keeps that axis' spacing (MONAI's Spacing): the slices stay where they are
        self.spacing = None if pixdim is None else Spacing(pixdim=[*pixdim, -1.0], padding_mode="zeros")

    def _steps(self, image: MetaTensor) -> tuple[bool, bool]:
        """Whether ``image`` needs reorienting, and whether (once reoriented) it needs in-plane resampling."""
        affine = np.asarray(image.affine, dtype=float)
        orient = "".join(nib.orientations.aff2axcodes(affine)) != self.axcodes
        if self.spacing is None:
            return orient, False
        sizes = voxel_sizes(affine)
        if orient:  # the sizes of the axes that become the first two
            ornt = nib.orientations.axcodes2ornt(self.axcodes)
            current = nib.orientations.io_orientation(affine)
            order = nib.orientations.ornt_transform(current, ornt)[:, 0].astype(int)
            sizes = sizes[np.argsort(order)]
        target = np.asarray(self.pixdim)
        return orient, bool((np.abs(sizes[:2] - target) > self.tolerance * target).any())

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise ValueError(
                    f"CanonicalFramed needs the '{key}' of the case as a MetaTensor with its affine (load it with "
                    "LoadImaged or LoadCaseImaged)."
                )
            orient, resample = self._steps(image)
            if orient:
                image = self.orientation(image)
            if resample:
                image = self.spacing(image, mode=mode)
                if mode != "nearest":
                    image = without_rounding_noise(image)
            self.push_transform(image, extra_info={"oriented": orient, "resampled": resample})
            d[key] = image
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            steps = self.pop_transform(image)[TraceKeys.EXTRA_INFO]
            if steps["resampled"]:
                image = self.spacing.inverse(image)
            if steps["oriented"]:
                image = self.orientation.inverse(image)
            d[key] = image
        return d
