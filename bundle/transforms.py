"""Dictionary transforms the SegAN pipeline needs on top of MONAI's: modality selection, label <-> regions,
cropping inference input to the foreground on the network's grid, and neighbouring slices as context
channels. Loading a case with its checks is :mod:`bundle.loading`; saving one prediction per case is
:mod:`bundle.saving`.

Everything else in the pipelines (loading, cropping, normalisation, slice sampling, inversion) is a MONAI
transform wired in the configs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForeground, CropForegroundd, MapTransform

from .cases import loaded_from
from .constants import MODALITIES, MSD_MODALITIES

__all__ = [
    "SelectModalitiesd",
    "LabelToRegionsd",
    "RegionsToLabeld",
    "CropForegroundToGridd",
    "ContextSlicesd",
    "SLICE_AXES",
    "view_order",
    "view_grid",
    "widen_to_grid",
    "source_name",
]

#: The stored volume's axes a 2D network may slice along (``slice_axis``): 2, the third axis, is the axial one of
#: BraTS-layout volumes (the paper's slices); 0 and 1 give the sagittal and coronal views.
SLICE_AXES = (0, 1, 2)


def view_order(slice_axis: int) -> list[int]:
    """The spatial axes of a volume seen along ``slice_axis``: the other two in their stored order, then it.

    A volume permuted so (``torch.movedim(axis, -1)`` on the spatial axes) has its slices along the last axis,
    where training draws them and the sliding-slice inferer runs; ``slice_axis`` 2 is the identity.
    """
    axis = int(slice_axis)
    if axis not in SLICE_AXES:
        raise ValueError(
            f"slice_axis must be one of {list(SLICE_AXES)} (the stored volume's axis to slice along), got {slice_axis!r}."
        )
    return [a for a in SLICE_AXES if a != axis] + [axis]


def view_grid(slice_axes: Sequence[int], in_plane: int, across: int = 1) -> list[int]:
    """Per stored axis, ``in_plane`` on an axis some view in ``slice_axes`` sees in plane, ``across`` on one every
    view slices along: the multiple a volume is padded to (the network's down-sampling factor, 1 across slices) or
    the foreground crop's margin (context in plane, none across slices)."""
    axes = {view_order(a)[-1] for a in slice_axes}
    return [across if axes == {a} else in_plane for a in SLICE_AXES]


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a (Meta)Tensor in ``data[key]`` was loaded from, for error messages."""
    name = loaded_from(data.get(key), data.get(f"{key}_meta_dict"))
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    return str(name) if name else f"the '{key}' of this case"


class SelectModalitiesd(MapTransform):
    """Keep the modality channels the network takes, in the order it takes them.

    The paper feeds T1c, T2 and FLAIR (section 3). A case given as one file per modality is stacked in
    ``available`` order (``bundle.constants.MODALITIES`` for the datalist builder and the demo). A case
    given as one 4D file with channels last (what MONAI Label sends, and the Medical Segmentation
    Decathlon's Task01 layout: FLAIR, T1, T1c, T2) is read in ``available_4d`` order; MONAI's loader
    records which of the two it was in the ``original_channel_dim`` meta data.

    Args:
        keys: the channel-first image key(s).
        available: the modality of each channel of a stacked multi-file case.
        selected: the modalities to keep, in network input order.
        available_4d: the modality of each channel of a single 4D file; ``None`` uses ``available``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        available: Sequence[str] = MODALITIES,
        selected: Sequence[str] = ("t1c", "t2", "flair"),
        available_4d: Sequence[str] | None = MSD_MODALITIES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selected = [str(m).lower() for m in selected]
        stacked = [str(m).lower() for m in available]
        self.available = {
            "stacked": stacked,
            "4d": stacked if available_4d is None else [str(m).lower() for m in available_4d],
        }
        self._index("stacked")  # the usual layout is checked up front; the 4D order when a 4D case comes

    @staticmethod
    def _setting(layout: str) -> str:
        return "image_modalities_4d" if layout == "4d" else "image_modalities"

    def _index(self, layout: str) -> list[int]:
        names = self.available[layout]
        missing = [m for m in self.selected if m not in names]
        if missing:
            setting = self._setting(layout)
            raise ValueError(
                f"modalities {missing} are not among the image's channels {names}: "
                f"set `modalities` to a subset of `{setting}`, or `{setting}` to the channels your images hold."
            )
        return [names.index(m) for m in self.selected]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            meta = getattr(image, "meta", None) or {}
            layout = "4d" if str(meta.get("original_channel_dim")) in ("-1", "3") else "stacked"
            names, index = self.available[layout], self._index(layout)
            if image.shape[0] != len(names):
                raise ValueError(
                    f"{source_name(d, key)}: expected {len(names)} channels ({names}), got {image.shape[0]}. "
                    f"Set `{self._setting(layout)}` to the channel order of your images, or `modalities` to what they hold."
                )
            if index != list(range(len(names))):
                d[key] = image[index]
        return d


class LabelToRegionsd(MapTransform):
    """Turn an integer label map (1, ...) into binary region maps (R, ...), one per region.

    ``regions`` maps a region name to the label values it contains, e.g. the BraTS 2013-2021 convention
    ``{"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]}`` (the BraTS regions of Menze et al. 2015).
    Label values in no region (besides 0) raise an error naming the file, since they mean the regions do
    not match the dataset's convention.

    A label map stored as floating point is read to the nearest integer when every voxel lies within
    ``tolerance`` of one (a converter that wrote 4.0000005 for 4 would otherwise match no region and score
    Dice 0); a value farther from an integer (an interpolated label, an image given as the label) is an
    error naming the file and the first such values.
    """

    def __init__(
        self,
        keys: KeysCollection,
        regions: Mapping[str, Sequence[int]],
        dtype: torch.dtype = torch.uint8,
        tolerance: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not regions:
            raise ValueError("`regions` is empty: give at least one region, e.g. {'tumor': [1]}.")
        self.regions = {str(k): [int(v) for v in vals] for k, vals in dict(regions).items()}
        self.known = {0}.union(*self.regions.values())
        self.dtype = dtype
        self.tolerance = float(tolerance)

    def _integers(self, label: torch.Tensor, name: str) -> torch.Tensor:
        """``label`` with every value an integer: floats within ``tolerance`` of one are rounded, others refused."""
        if not label.is_floating_point():
            return label
        rounded = torch.round(label)
        off = (label - rounded).abs() > self.tolerance
        if bool(off.any()):
            values = torch.unique(label[off])
            listed = ", ".join(f"{float(v):.6g}" for v in values[:5]) + (" ..." if len(values) > 5 else "")
            raise ValueError(
                f"{name}: {int(off.sum())} label voxel(s) are not integers (e.g. {listed}; tolerance "
                f"{self.tolerance:g}). A label map holds integer label values: if it was resampled, resample it again "
                "with nearest-neighbour interpolation; check that this file is the label, not an image."
            )
        return rounded

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise ValueError(f"{source_name(d, key)}: a label map needs 1 channel, got shape {tuple(label.shape)}.")
            label_t = self._integers(torch.as_tensor(label), source_name(d, key))
            values = {int(v) for v in torch.unique(label_t).tolist()}
            unknown = sorted(values - self.known)
            if unknown:
                raise ValueError(
                    f"{source_name(d, key)}: label values {unknown} belong to no region of {self.regions}. "
                    "Set `label_convention` (brats, brats2023, brats2024, msd) or `regions` to match your labels."
                )
            maps = [torch.isin(label_t[0], torch.tensor(vals, device=label_t.device)) for vals in self.regions.values()]
            out = torch.stack(maps).to(self.dtype)
            d[key] = MetaTensor(out, meta=label.meta) if isinstance(label, MetaTensor) else out
        return d


class RegionsToLabeld(MapTransform):
    """Paint binary region maps (R, ...) back into one integer label map (1, ...) in the dataset's convention.

    Regions are painted in order with ``labels[r]``, so for nested BraTS regions (whole tumour, core,
    enhancing) with labels ``[2, 1, 4]`` the result is edema 2, necrotic / non-enhancing core 1, enhancing 4.
    """

    def __init__(
        self,
        keys: KeysCollection,
        labels: Sequence[int],
        dtype: torch.dtype = torch.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.labels = [int(v) for v in labels]
        self.dtype = dtype

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            maps = d[key]
            if maps.shape[0] != len(self.labels):
                raise ValueError(
                    f"{len(self.labels)} region labels {self.labels} for {maps.shape[0]} region maps: "
                    "`region_labels` needs one value per region."
                )
            out = torch.zeros((1, *maps.shape[1:]), dtype=self.dtype, device=maps.device)
            for r, value in enumerate(self.labels):
                out[0][torch.as_tensor(maps[r]) > 0] = value
            d[key] = (
                MetaTensor(out, meta=maps.meta, applied_operations=maps.applied_operations)
                if isinstance(maps, MetaTensor)
                else out
            )
        return d


def any_nonzero(image: torch.Tensor) -> torch.Tensor:
    """Foreground of a normalised skull-stripped image: voxels where any channel is nonzero (background is 0)."""
    return (image != 0).any(0, keepdim=True)


def widen_to_grid(start, end, grid, size) -> tuple[np.ndarray, np.ndarray]:
    """The box ``[start, end)`` widened outwards to multiples of ``grid`` per axis, within ``[0, size)``: it then
    starts on the network's down-sampling grid (the volume crop here, each slice's box in
    :class:`bundle.inferers.ForegroundSliceInferer`)."""
    start, end, grid = np.asarray(start), np.asarray(end), np.asarray(grid)
    return np.floor_divide(start, grid) * grid, np.minimum(-np.floor_divide(-end, grid) * grid, np.asarray(size))


class _GridCropForeground(CropForeground):
    """``CropForeground`` whose box (foreground bounding box plus margin) is widened outwards to a grid."""

    def __init__(self, grid: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.grid = np.asarray(grid)

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        start, end = super().compute_bounding_box(img)  # margin added and clipped to the image (allow_smaller)
        if (end <= start).any():  # no foreground: an empty box, nothing to compute
            return np.zeros_like(start), np.zeros_like(end)
        return widen_to_grid(start, end, self.grid, img.shape[1:])


class CropForegroundToGridd(CropForegroundd):
    """Crop inference input to its foreground (the brain) plus a margin, on the 2D network's grid.

    Most of a BraTS frame is air: convolving it is wasted work. This crops every key to the bounding box of the
    voxels where ``select_fn`` holds (by default: any channel nonzero, the background of a normalised
    skull-stripped image) in ``source_key``, widened by ``margin`` and then outwards to multiples of ``grid``.
    With a spatial ``grid`` of ``2 ** levels`` on an input already padded to that multiple, the cropped box
    starts on the network's down-sampling grid, so every output voxel whose receptive field lies inside the
    box is computed exactly as in the full frame. Along the slice axis (grid 1, margin 0) the crop drops the
    slices with no foreground, which a 2D network never needed. A case with no foreground becomes an empty
    image (see ``bundle.inferers.ForegroundSliceInferer``). ``Invertd`` pads the result back into the frame.

    Args:
        keys: keys to crop.
        source_key: the image whose foreground defines the box.
        grid: per spatial axis, the multiple the box is aligned to and sized in, e.g. ``[16, 16, 1]``.
        margin: voxels added on each side of the foreground box per axis before aligning, e.g. ``[16, 16, 0]``.
        select_fn: foreground of the source image (a channel-first array -> a boolean mask).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str,
        grid: Sequence[int] | int,
        margin: Sequence[int] | int = 0,
        select_fn=any_nonzero,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, source_key, select_fn=select_fn, margin=margin, allow_missing_keys=allow_missing_keys)
        # the box never leaves the image (allow_smaller), so nothing is padded
        self.cropper = _GridCropForeground(grid=grid, select_fn=select_fn, margin=margin, allow_smaller=True)


def context_slice_indices(depth: int, context_slices: int) -> torch.Tensor:
    """(2k+1, depth) slice indices: row ``j`` holds, for every axial slice ``z``, slice ``z + j - k`` clamped
    to ``[0, depth - 1]`` (beyond the first or last slice the edge slice is repeated)."""
    offsets = torch.arange(-context_slices, context_slices + 1).unsqueeze(1)
    return (torch.arange(depth).unsqueeze(0) + offsets).clamp_(0, depth - 1)


class ContextSlicesd(MapTransform):
    """2.5D input: give every axial slice its ``k`` neighbours on each side as extra channels (beyond the paper).

    A channel-first volume (C, H, W, D) becomes (C * (2k+1), H, W, D): channel block ``j`` (of C channels,
    the modalities in order) holds slice ``z + j - k`` at depth ``z``, so block ``k`` is the volume itself
    and a 2D network that reads one axial slice of the result sees 2k+1 neighbouring slices of every
    modality. Beyond the volume's first and last slice the edge slice is repeated. Applied to the
    preprocessed volume before slices are drawn in training and before the sliding-slice inferer runs,
    it gives both the same neighbours. ``context_slices=0`` returns the input unchanged. ``slice_axis`` is the
    spatial axis slices are cut along (:func:`view_order`): the last, 2, in training, which permutes each volume to
    its view first; the stored one in inference, which keeps the stored frame and permutes in the inferer.
    """

    def __init__(
        self, keys: KeysCollection, context_slices: int = 0, slice_axis: int = 2, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(context_slices) < 0:
            raise ValueError(f"context_slices must be >= 0 (neighbours on each side), got {context_slices}.")
        self.context_slices = int(context_slices)
        self.slice_axis = view_order(slice_axis)[-1]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not self.context_slices:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4:
                raise ValueError(
                    f"{source_name(d, key)}: context_slices needs a channel-first 3D volume (C, H, W, D), "
                    f"got shape {tuple(image.shape)}."
                )
            dim = 1 + self.slice_axis
            index = context_slice_indices(image.shape[dim], self.context_slices).to(image.device)
            stacked = torch.cat([image.index_select(dim, row) for row in index], dim=0)
            if isinstance(image, MetaTensor):
                stacked = MetaTensor(stacked.as_tensor(), meta=image.meta, applied_operations=image.applied_operations)
            d[key] = stacked
        return d
