"""Dictionary transforms the SegAN pipeline needs on top of MONAI's: modality selection, label <-> regions,
cropping inference input to the foreground on the network's grid, and neighbouring slices as context
channels. Saving one prediction per case is :mod:`bundle.saving`.

Everything else in the pipelines (loading, cropping, normalisation, slice sampling, inversion) is a MONAI
transform wired in the configs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForeground, CropForegroundd, LoadImage, LoadImaged, MapTransform
from monai.utils import ensure_tuple

from .cases import loaded_from
from .constants import MODALITIES, MSD_MODALITIES

__all__ = [
    "LoadCaseImaged", "SelectModalitiesd", "LabelToRegionsd", "RegionsToLabeld", "CropForegroundToGridd",
    "ContextSlicesd", "source_name",
]


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a (Meta)Tensor in ``data[key]`` was loaded from, for error messages."""
    name = loaded_from(data.get(key), data.get(f"{key}_meta_dict"))
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    return str(name) if name else f"the '{key}' of this case"


class LoadCaseImaged(LoadImaged):
    """``LoadImaged`` for one case, whose every failure names the case, the file and what to do.

    MONAI's loader reports a damaged file as a bare ``EOFError``, modalities on different grids as a shape
    mismatch with no file named, and a 2D or 5D image only later, as an unrelated shape error. This loader
    also refuses what would silently spoil a run: NaN or infinite voxels (a NaN loss in training, an empty
    segmentation at inference) and keys of one case on different grids (an image and its label).

    Every case must be 3D: one 3D file per modality, or one 4D file (modalities last). A failed load is
    diagnosed file by file (on the error path only, so a good case is read once).

    Args:
        keys: the keys to load, e.g. ``["image", "label"]``.
        case_key: item key holding the case id, for messages.
        spatial_dims: the spatial dimensions each key must have.
        kwargs: other ``LoadImaged`` arguments (``image_only``, ``ensure_channel_first``, ``reader``, ...).
    """

    def __init__(self, keys: KeysCollection, case_key: str = "case", spatial_dims: int = 3, **kwargs) -> None:
        super().__init__(keys, **kwargs)
        self.case_key = case_key
        self.spatial_dims = int(spatial_dims)

    def _case(self, data: Mapping) -> str:
        if data.get(self.case_key):
            return f"case '{data[self.case_key]}'"
        for key in self.keys:
            if key in data:
                return f"case '{ensure_tuple(data[key])[0]}'"
        return "this case"

    def __call__(self, data: Mapping, reader=None) -> dict:
        try:
            d = super().__call__(data, reader)
        except Exception as error:
            self._diagnose(data, error)
            raise
        shapes = {}
        for key in self.key_iterator(d):
            image = d[key]
            spatial = tuple(int(v) for v in image.shape)
            if self._loader.ensure_channel_first:
                spatial = spatial[1:]
            else:
                channel_dim = str(getattr(image, "meta", {}).get("original_channel_dim", "no_channel"))
                if channel_dim not in ("nan", "no_channel"):
                    spatial = tuple(v for i, v in enumerate(spatial) if i != int(channel_dim) % image.ndim)
            if len(spatial) != self.spatial_dims:
                raise ValueError(
                    f"{self._case(d)}: {_quoted(data[key])} "
                    f"{'is a' if isinstance(data[key], str) else 'are'} {len(spatial)}D "
                    f"image{'' if isinstance(data[key], str) else 's'}, loaded as shape {tuple(image.shape)}; "
                    f"a case needs {self.spatial_dims}D volumes (one file per modality, or one 4D file with the "
                    "modalities last). Convert the file, or remove the case."
                )
            shapes[key] = spatial
            self._check_finite(d, key, [str(f) for f in ensure_tuple(data[key])])
        if len(set(shapes.values())) > 1:
            listed = "; ".join(f"{key} {_quoted(data[key])}: {shape}" for key, shape in shapes.items())
            raise ValueError(
                f"{self._case(d)}: its files are on different grids ({listed}). An image and its label must have the "
                "same shape: resample them to one grid, or remove the case."
            )
        return d

    def _check_finite(self, d: Mapping, key: Hashable, files: list[str]) -> None:
        image = torch.as_tensor(d[key])
        finite = torch.isfinite(image)
        if bool(finite.all()):
            return
        first = tuple(int(i) for i in torch.nonzero(~finite)[0])
        where = _quoted(files)
        if len(files) > 1 and image.shape[0] == len(files):  # a stacked case: the channel says which file
            where, first = f"'{files[first[0]]}'", first[1:]
        raise ValueError(
            f"{self._case(d)}: {where} holds {int((~finite).sum())} NaN or infinite voxel(s), the first at index "
            f"{list(first)}. They would turn the training loss into NaN and the segmentation into background: "
            "fix the file (e.g. replace them with 0) or remove the case."
        )

    def _diagnose(self, data: Mapping, error: Exception) -> None:
        """Raise an error naming the file that does not load, or the shapes that do not stack."""
        case = self._case(data)
        single = LoadImage(image_only=True)
        for key in self.key_iterator(dict(data)):
            files = [str(f) for f in ensure_tuple(data[key])]
            shapes = {}
            for file in files:
                try:
                    shapes[file] = tuple(int(v) for v in single(file).shape)
                except Exception as file_error:
                    raise ValueError(
                        f"{case}: cannot read '{file}' ({type(file_error).__name__}: {file_error}). The file is damaged "
                        "(e.g. truncated by an interrupted copy or download), empty or not an image: copy it again, "
                        "or remove the case."
                    ) from error
            if len(set(shapes.values())) > 1:
                listed = "; ".join(f"'{f}': {s}" for f, s in shapes.items())
                raise ValueError(
                    f"{case}: its modality files have different shapes ({listed}). All modalities of a case must be "
                    "on one grid: resample them to one (e.g. the T1c's), or remove the case."
                ) from error
        files = [str(f) for key in self.key_iterator(dict(data)) for f in ensure_tuple(data[key])]
        raise ValueError(f"{case}: loading {files} failed: {type(error).__name__}: {error}") from error


def _quoted(files) -> str:
    return ", ".join(f"'{f}'" for f in ensure_tuple(files))


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
        self.available = {"stacked": stacked, "4d": stacked if available_4d is None else [str(m).lower() for m in available_4d]}
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
    ``{"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]}`` (SPEC section 2).
    Label values in no region (besides 0) raise an error naming the file, since they mean the regions do
    not match the dataset's convention.
    """

    def __init__(
        self,
        keys: KeysCollection,
        regions: Mapping[str, Sequence[int]],
        dtype: torch.dtype = torch.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not regions:
            raise ValueError("`regions` is empty: give at least one region, e.g. {'tumor': [1]}.")
        self.regions = {str(k): [int(v) for v in vals] for k, vals in dict(regions).items()}
        self.known = {0}.union(*self.regions.values())
        self.dtype = dtype

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise ValueError(f"{source_name(d, key)}: a label map needs 1 channel, got shape {tuple(label.shape)}.")
            label_t = torch.as_tensor(label)
            values = {int(v) for v in torch.unique(label_t).tolist()}
            unknown = sorted(values - self.known)
            if unknown:
                raise ValueError(
                    f"{source_name(d, key)}: label values {unknown} belong to no region of {self.regions}. "
                    "Set `label_convention` (brats, brats2023, msd) or `regions` to match your labels."
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
            d[key] = MetaTensor(out, meta=maps.meta, applied_operations=maps.applied_operations) if isinstance(
                maps, MetaTensor
            ) else out
        return d


def any_nonzero(image: torch.Tensor) -> torch.Tensor:
    """Foreground of a normalised skull-stripped image: voxels where any channel is nonzero (background is 0)."""
    return (image != 0).any(0, keepdim=True)


class _GridCropForeground(CropForeground):
    """``CropForeground`` whose box (foreground bounding box plus margin) is widened outwards to a grid."""

    def __init__(self, grid: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.grid = np.asarray(grid)

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        start, end = super().compute_bounding_box(img)  # margin added and clipped to the image (allow_smaller)
        if (end <= start).any():  # no foreground: an empty box, nothing to compute
            return np.zeros_like(start), np.zeros_like(end)
        size = np.asarray(img.shape[1:])
        start = np.floor_divide(start, self.grid) * self.grid
        end = np.minimum(-np.floor_divide(-end, self.grid) * self.grid, size)
        return start, end


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
    it gives both the same neighbours. ``context_slices=0`` returns the input unchanged.
    """

    def __init__(self, keys: KeysCollection, context_slices: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(context_slices) < 0:
            raise ValueError(f"context_slices must be >= 0 (neighbours on each side), got {context_slices}.")
        self.context_slices = int(context_slices)

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
            index = context_slice_indices(image.shape[-1], self.context_slices).to(image.device)
            stacked = torch.cat([image[..., row] for row in index], dim=0)
            if isinstance(image, MetaTensor):
                stacked = MetaTensor(stacked.as_tensor(), meta=image.meta, applied_operations=image.applied_operations)
            d[key] = stacked
        return d
