"""BraTS post-processing of the predicted region maps: a threshold per region, removal of small connected
components, and the enhancing-tumour volume rule. Every step is a config key that is off by default
(``threshold`` 0.5, ``min_component_size`` 0, ``et_min_volume`` 0); ``scripts/cross_validate.py
--choose_postprocessing`` keeps a step only if it improves the out-of-fold mean Dice, as nnU-Net decides its
post-processing (Isensee et al. 2021, Nature Methods 18:203-211).

The steps run on the binary region maps after ``Invertd``, in the case's own geometry, before the label map is
painted: a size in voxels then means voxels of the written file, the ones the evaluation scores, whatever the
preprocessing crops, pads or resamples; and the cross-validation can choose the steps on the saved out-of-fold
probability maps (:class:`SaveProbabilitiesd`, also in the case's geometry) with the same functions.

MONAI's ``RemoveSmallObjectsd`` takes one size for every channel, passes the channel-first array to scikit-image
whole (so at connectivity 2 or 3 a component continues across channels) and needs scikit-image (not a dependency
of this bundle; its 0.26 release deprecates the argument MONAI passes); and ``KeepLargestConnectedComponentd`` would drop
every lesion of a multifocal tumour but one; the components here are ``scipy.ndimage.label``'s, 26-connected as in
the BraTS lesion-wise evaluation, and one labelling gives the sizes for every candidate of the cross-validation.

The enhancing-tumour rule is the one BraTS entries use (e.g. Isensee et al., BraTS 2018 and nnU-Net's BraTS 2020
entry): a case without enhancing tumour scores Dice 0 for any false-positive enhancing voxel and 1 for none, so a
small predicted enhancing region is more likely to cost than to gain; it is relabelled as tumour core (removed
from the enhancing region, kept in the core and whole tumour).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from scipy import ndimage

from .cases import case_id
from .files import atomic_path

__all__ = [
    "ENHANCING",
    "per_region",
    "enhancing_rule_regions",
    "component_sizes",
    "remove_small_components",
    "relabel_small_enhancing",
    "ThresholdRegionsd",
    "RemoveSmallComponentsd",
    "RelabelSmallEnhancingd",
    "SaveProbabilitiesd",
    "load_probabilities",
]

#: Name of the enhancing-tumour region in every label convention (``bundle.constants``).
ENHANCING = "enhancing_tumor"
#: Region that takes a relabelled enhancing tumour when no region contains it (the classes of ``multiclass``).
_CORE_CLASS = "necrotic_core"


def per_region(value: Any, region_names: Sequence[str], key: str, off: Any) -> list:
    """One value per region from a config value: a single value for every region, a list in region order, or a
    mapping ``{region name: value}`` (regions it does not name get ``off``). Raises naming ``key`` otherwise."""
    names = [str(n) for n in region_names]
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if str(k) not in names)
        if unknown:
            raise ValueError(f"`{key}` names regions {unknown} that are not among the regions {names}; fix --{key}.")
        return [value.get(n, off) for n in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(
                f"`{key}` has {len(value)} values {list(value)} for {len(names)} regions {names}: give one value, "
                f"one per region in that order, or a mapping region name -> value. Fix --{key}."
            )
        return list(value)
    return [value] * len(names)


def enhancing_rule_regions(regions: Mapping[str, Sequence[int]], key: str = "et_min_volume") -> tuple[int, list[int]]:
    """``(enhancing channel, channels that take its voxels)`` for the enhancing-tumour rule.

    The enhancing tumour is the region named ``enhancing_tumor``; its voxels go to every other region that holds
    all of its label values (the tumour core and whole tumour of the BraTS regions), or, for mutually exclusive
    classes (``multiclass``), to the ``necrotic_core`` class. Raises naming ``key`` if there is no such region.
    """
    names = [str(n) for n in regions]
    if ENHANCING not in names:
        raise ValueError(
            f"`{key}` relabels a small enhancing tumour, but the regions {names} have no '{ENHANCING}' region: "
            f"set --{key} 0, or use a label convention with an enhancing tumour region."
        )
    source = names.index(ENHANCING)
    labels = {int(v) for v in regions[ENHANCING]}
    into = [i for i, n in enumerate(names) if i != source and labels <= {int(v) for v in regions[n]}]
    if not into and _CORE_CLASS in names:
        into = [names.index(_CORE_CLASS)]
    if not into:
        raise ValueError(
            f"`{key}`: no region of {names} contains the '{ENHANCING}' labels {sorted(labels)} (nor is there a "
            f"'{_CORE_CLASS}' class) to relabel a small enhancing tumour into; set --{key} 0."
        )
    return source, into


def component_sizes(mask: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sizes)`` of a binary mask's connected components: ``labels`` numbers each component from 1
    (``scipy.ndimage.label``, ``connectivity`` 3 = 26-neighbourhood in 3D), ``sizes[i]`` is component ``i``'s
    number of voxels (``sizes[0]`` the background's)."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, _ = ndimage.label(mask, structure=structure)
    return labels, np.bincount(labels.ravel())


def remove_small_components(mask: np.ndarray, min_size: int, connectivity: int = 3, components=None) -> np.ndarray:
    """``mask`` (binary, spatial dimensions only) without its connected components of fewer than ``min_size``
    voxels; ``components``: the mask's :func:`component_sizes`, if already computed."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 0 or not mask.any():
        return mask
    labels, sizes = components if components is not None else component_sizes(mask, connectivity)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def relabel_small_enhancing(maps: np.ndarray, min_volume: int, source: int, into: Sequence[int]) -> np.ndarray:
    """Region maps ``(R, ...)`` where an enhancing region (channel ``source``) of fewer than ``min_volume`` voxels
    is moved into channels ``into`` (the core and whole tumour) and removed from ``source``."""
    enhancing = np.asarray(maps[source], dtype=bool)
    volume = int(enhancing.sum())
    if min_volume <= 0 or volume == 0 or volume >= min_volume:
        return maps
    maps = maps.copy()
    for channel in into:
        maps[channel] = np.logical_or(maps[channel], enhancing)
    maps[source] = 0
    return maps


def _like(array: np.ndarray, reference) -> torch.Tensor:
    """``array`` as a tensor of ``reference``'s dtype and device, with its meta data if it is a MetaTensor."""
    out = torch.as_tensor(array, device=reference.device).to(reference.dtype)
    if isinstance(reference, MetaTensor):
        return MetaTensor(out, meta=reference.meta, applied_operations=reference.applied_operations)
    return out


class ThresholdRegionsd(MapTransform):
    """Binary region maps from sigmoid probabilities ``(R, ...)``: voxel in region ``r`` iff ``p_r >= threshold_r``.

    ``threshold`` is one number for every region, a list in region order or a mapping region name -> number
    (regions it does not name keep 0.5). MONAI's ``AsDiscreted`` takes one threshold for all channels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | Sequence[float] | Mapping[str, float],
        region_names: Sequence[str],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.thresholds = [float(t) for t in per_region(threshold, region_names, "threshold", 0.5)]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            prob = d[key]
            if prob.shape[0] != len(self.thresholds):
                raise ValueError(f"{len(self.thresholds)} thresholds for {prob.shape[0]} channels of '{key}'.")
            cut = torch.as_tensor(self.thresholds, dtype=prob.dtype, device=prob.device)
            d[key] = (prob >= cut.reshape(-1, *([1] * (prob.ndim - 1)))).to(prob.dtype)
        return d


class RemoveSmallComponentsd(MapTransform):
    """Remove the connected components of fewer than ``min_size`` voxels from each binary region map.

    ``min_size`` is one integer for every region, a list in region order, or a mapping region name -> integer
    (regions it does not name: 0); 0 keeps every component. Components are 26-connected in 3D (``connectivity``
    3), as the BraTS lesion-wise evaluation counts lesions.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int | Sequence[int] | Mapping[str, int],
        region_names: Sequence[str],
        connectivity: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_sizes = [int(s) for s in per_region(min_size, region_names, "min_component_size", 0)]
        self.connectivity = connectivity

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not any(s > 0 for s in self.min_sizes):
            return d
        for key in self.key_iterator(d):
            maps = d[key]
            array = convert_to_numpy(maps) > 0
            if array.shape[0] != len(self.min_sizes):
                raise ValueError(f"{len(self.min_sizes)} component sizes for {array.shape[0]} channels of '{key}'.")
            out = np.stack([remove_small_components(m, s, self.connectivity) for m, s in zip(array, self.min_sizes)])
            d[key] = _like(out, maps)
        return d


class RelabelSmallEnhancingd(MapTransform):
    """The BraTS enhancing-tumour rule: an enhancing tumour of fewer than ``min_volume`` voxels becomes tumour core.

    Its voxels leave the ``enhancing_tumor`` map and join the regions that contain it (see
    :func:`enhancing_rule_regions`), so the label map paints them as the core. ``min_volume`` 0 is off; with it
    on, regions without an ``enhancing_tumor`` region are refused naming ``et_min_volume``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_volume: int,
        regions: Mapping[str, Sequence[int]],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_volume = int(min_volume)
        self.source, self.into = enhancing_rule_regions(regions) if self.min_volume > 0 else (0, [])

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.min_volume <= 0:
            return d
        for key in self.key_iterator(d):
            maps = d[key]
            out = relabel_small_enhancing(convert_to_numpy(maps) > 0, self.min_volume, self.source, self.into)
            d[key] = _like(out, maps)
        return d


class SaveProbabilitiesd(MapTransform):
    """Save each case's probability maps ``(R, ...)`` as ``<output_dir>/<case>.npz`` (float16, compressed).

    Placed after ``Invertd`` and before the thresholds, it keeps what the post-processing starts from, in the
    case's geometry, so ``scripts/cross_validate.py --choose_postprocessing`` can try thresholds, component sizes
    and the enhancing-tumour rule without running the network again (nnU-Net saves its out-of-fold softmax for
    the same purpose). The file holds ``probabilities`` and ``regions`` (the channel names).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        region_names: Sequence[str],
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = str(output_dir)
        self.region_names = [str(n) for n in region_names]
        self.case_key = case_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            case = case_id(d, self.case_key)  # as the report names its rows
            if not case or os.path.isabs(case) or ".." in case.replace("\\", "/").split("/"):
                raise ValueError(f"SaveProbabilitiesd: cannot name a file in {self.output_dir} after case {case!r}.")
            with atomic_path(os.path.join(self.output_dir, f"{case}.npz"), suffix=".npz") as tmp:
                np.savez_compressed(
                    tmp, probabilities=convert_to_numpy(d[key]).astype(np.float16), regions=self.region_names
                )
        return d


def load_probabilities(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """``(probabilities as float32, region names)`` from a :class:`SaveProbabilitiesd` file."""
    with np.load(path) as saved:
        return saved["probabilities"].astype(np.float32), [str(n) for n in saved["regions"]]
