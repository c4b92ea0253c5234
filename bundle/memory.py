"""Training cache that scales: smaller storage types, a disk cache, and a memory estimate before caching.

The training loader caches every case's normalised, cropped volume once and cuts many slices from it
(:mod:`bundle.sampling`). At the paper's crop (180x180x128, three modalities in float32, three uint8 region
maps) a case holds 62 MB, so BraTS 2021's 1,251 cases would take 78 GB. Three keys of ``configs/train.json``
make this fit a workstation:

* ``cache_dtype``: ``float32`` (default, unchanged), ``float16``, or ``uint8`` quantised per channel. The
  quantised value ``q`` stands for ``(q - zero) * scale``; the zero level is an integer, so the air that the
  normalisation sets to 0 stays exactly 0 (the masked critic input ``x o S(x)`` relies on it, Xue et al. 2018,
  eq. 2). Region maps (0/1) are stored exactly as uint8. :class:`CacheDtyped` stores,
  :func:`restore` (called by ``RandAxialSlicesd`` on each cut patch only) turns a patch back to float32.
* ``cache_dir``: a folder: the cache lives on disk (MONAI ``PersistentDataset``), read back per visit, and
  memory holds one batch's volumes.
* before an in-memory cache is filled, :func:`check_cache_memory` compares cases x case shape x channels x
  bytes with the memory available and stops with the keys to change.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import look_up_option

__all__ = [
    "CACHE_DTYPES",
    "CacheDtyped",
    "TrainingCache",
    "available_memory",
    "case_bytes",
    "check_cache_memory",
    "restore",
]

logger = logging.getLogger(__name__)

#: bytes per stored image voxel of each ``cache_dtype``
CACHE_DTYPES = {"float32": 4, "float16": 2, "uint8": 1}
#: item key postfix of a quantised key's encoding: a ``(C, 2)`` float32 tensor of per-channel ``(scale, zero)``
ENCODING = "_encoding"


def _dtype_name(dtype) -> str:
    """``dtype`` (a name or a torch dtype) as one of :data:`CACHE_DTYPES`' names, or a ``ValueError``."""
    return look_up_option(str(dtype).replace("torch.", ""), list(CACHE_DTYPES))


def _plain(value) -> torch.Tensor:
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (C, ...) float as uint8 per channel, and the ``(C, 2)`` ``(scale, zero)`` that restore it.

    Each channel's range (with 0 in it) spans the 256 levels; the zero level is rounded to an integer so that
    0 is stored exactly, and only 0 is stored there (a nonzero value that rounds to it takes the next level):
    a voxel is 0 after restoring exactly when it was 0 before. The error of a voxel is at most ``scale / 2``
    (``scale`` = range / 255), one ``scale`` next to 0 and at the top of the range.
    """
    x = x.float()
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(1).values.clamp(max=0)
    high = flat.max(1).values.clamp(min=0)
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale)
    shape = (-1,) + (1,) * (x.ndim - 1)
    levels = torch.round(x / scale.view(shape) + zero.view(shape))
    # the zero level is kept for exact zeros: a head voxel near 0 must not pass for air, whose masked critic
    # input x o S(x) has no gradient there (Xue et al. 2018, eq. 2)
    levels = torch.where((levels == zero.view(shape)) & (x != 0), zero.view(shape) + torch.sign(x), levels)
    q = levels.clamp_(0, 255).to(torch.uint8)
    return q, torch.stack([scale, zero], 1)


def restore(patch: torch.Tensor, encoding: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stored patch (C, ...) (a cut of a :class:`CacheDtyped` volume) as ``dtype`` values, always a copy.

    ``encoding`` is the item's ``<key>_encoding``: ``None`` (float16, or exact uint8 region maps: a cast) or
    ``(C, 2)`` ``(scale, zero)`` per channel (quantised).
    """
    if encoding is None:
        return patch.to(dtype, copy=True)
    encoding = _plain(encoding)
    shape = (-1,) + (1,) * (patch.ndim - 1)
    scale, zero = encoding[:, 0].view(shape), encoding[:, 1].view(shape)
    return ((patch.float() - zero) * scale).to(dtype)


class CacheDtyped(MapTransform):
    """Store cached volumes in ``dtype`` (``cache_dtype``) before caching; ``restore`` undoes it per patch.

    * ``float32``: nothing changes (the default; seeded runs are as before).
    * ``float16``: float channels cast to float16 (relative error below 2**-11; 0 stays 0).
    * ``uint8``: float channels quantised per channel (:func:`quantise`; 0 stays 0).

    In both smaller types, a key whose every value is 0 or 1 (the region maps) is stored exactly as uint8,
    channel for channel (``bundle.guards.require_foreground`` reads the cached maps by channel). The
    quantisation travels with the item as ``<key>_encoding`` and is consumed by ``bundle.sampling.RandAxialSlicesd``, which restores
    only the patches it cuts.

    Args:
        keys: the volumes to store (e.g. ``["image", "label"]``).
        dtype: ``"float32"``, ``"float16"`` or ``"uint8"``.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, dtype: str = "float32", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype = _dtype_name(dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.dtype == "float32":
            return d
        for key in self.key_iterator(d):
            x = _plain(d[key])
            if not x.is_floating_point():
                x = x.float()
            if _is_binary(x):
                d[key] = x.to(torch.uint8).contiguous()
            elif self.dtype == "float16":
                d[key] = x.to(torch.float16).contiguous()
            else:
                d[key], d[f"{key}{ENCODING}"] = quantise(x)
        return d


def case_bytes(case_shape: Sequence[int], image_channels: int, label_channels: int, dtype: str) -> int:
    """Bytes one cached case takes: ``case_shape`` (spatial) x channels x bytes of ``dtype``.

    The region maps take one byte per voxel and channel whatever the type (``LabelToRegionsd`` makes them
    uint8; :class:`CacheDtyped` keeps 0/1 maps so).
    """
    dtype = _dtype_name(dtype)
    voxels = math.prod(int(s) for s in case_shape)
    return voxels * (image_channels * CACHE_DTYPES[dtype] + label_channels)


def _cgroup_limit() -> int | None:
    """The memory left under this process's cgroup limit, if it has one (containers, job schedulers)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now: psutil if installed, else ``/proc/meminfo``, else
    ``os.sysconf``; the smaller of that and what a cgroup limit leaves. ``None`` when nothing tells."""
    found = None
    try:
        import psutil

        found = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            found = int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, ValueError, OSError):
                found = None
    limit = _cgroup_limit()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_cache_memory(
    cases: int,
    case_shape: Sequence[int],
    image_channels: int,
    label_channels: int,
    dtype: str = "float32",
    fraction: float = 0.8,
    available: int | None = None,
) -> int:
    """Stop before caching when the training cache would not fit in memory; returns its estimated bytes.

    The estimate is ``cases x prod(case_shape) x channels x bytes`` (:func:`case_bytes`); it must stay under
    ``fraction`` of the memory available (:func:`available_memory`, or ``available``), the rest being left for
    the networks, the loader and everything else on the machine. The error names the keys that shrink it.
    """
    per_case = case_bytes(case_shape, image_channels, label_channels, dtype)
    total = int(cases) * per_case
    available = available_memory() if available is None else int(available)
    if available is None:
        logger.warning(f"training cache: {_gb(total)} for {cases} cases; the memory available is unknown, not checked.")
        return total
    logger.info(
        f"training cache: {cases} cases x {_gb(per_case)} ({dtype}) = {_gb(total)}, {_gb(available)} available."
    )
    if total > float(fraction) * available:
        smaller = {name: case_bytes(case_shape, image_channels, label_channels, name) for name in CACHE_DTYPES}
        options = ", ".join(f"{name} {_gb(cases * b)}" for name, b in smaller.items() if name != dtype)
        raise MemoryError(
            f"the training cache would take {_gb(total)} ({cases} cases x {_gb(per_case)}: shape "
            f"{list(case_shape)}, {image_channels} image + {label_channels} label channels, cache_dtype {dtype}), "
            f"more than {fraction:.0%} of the {_gb(available)} of memory available. Set --cache_dtype uint8 or "
            f"float16 ({options}), or --cache_dir <folder> to cache on disk, or --cache_rate below 1 "
            f"(e.g. {max(fraction * available / total, 0.0):.2f}) to cache part of the cases."
        )
    return total


def _free_disk(folder: str) -> int | None:
    path = os.path.abspath(folder)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class TrainingCache:
    """Builds the training dataset from ``train#dataset``'s arguments: in memory after the estimate, or on disk.

    ``configs/train.json`` calls it as ``train#dataset``'s ``_target_`` (``@train#dataset_def``), so the
    dataset's own keys (``data``, ``transform``, ``cache_rate``, ``num_workers``, ``copy_cache``) keep their
    names and MONAI Label's overrides of ``train#dataset#data`` still apply.

    * ``cache_dir`` empty: a MONAI ``CacheDataset``, filled after :func:`check_cache_memory` passed.
    * ``cache_dir`` a folder: a MONAI ``PersistentDataset`` there (each case computed once, then read from
      disk per visit; ``cache_rate`` does not apply); a free-disk estimate is logged and too little disk refused.

    Args:
        cache_dir: folder of the disk cache, or ``""`` / ``None`` for memory.
        cache_dtype: the storage type of the cache (:class:`CacheDtyped`), for the estimate; the transform
            itself is in ``train#cache_transforms``.
        case_shape: spatial shape of one cached case (the training crop), for the estimate.
        image_channels, label_channels: channels of the cached image and label.
        fraction: the share of the available memory the cache may take.
        sampler: the random transform that cuts the cached volumes; float16 and uint8 need
            ``bundle.sampling.RandAxialSlicesd``, which restores the stored patches.
    """

    def __init__(
        self,
        cache_dir: str | None = "",
        cache_dtype: str = "float32",
        case_shape: Sequence[int] = (),
        image_channels: int = 0,
        label_channels: int = 0,
        fraction: float = 0.8,
        sampler: Any = None,
    ) -> None:
        self.cache_dir = str(cache_dir) if cache_dir else ""
        self.cache_dtype = _dtype_name(cache_dtype)
        self.case_shape = [int(s) for s in case_shape]
        self.image_channels, self.label_channels = int(image_channels), int(label_channels)
        self.fraction = float(fraction)
        if self.cache_dtype != "float32" and sampler is not None:
            from .sampling import RandAxialSlicesd

            if not isinstance(sampler, RandAxialSlicesd):
                raise ValueError(
                    f"cache_dtype {self.cache_dtype} needs the training sampler bundle.sampling.RandAxialSlicesd, "
                    f"which restores the stored patches; this configuration samples with "
                    f"{type(sampler).__name__}. Set --cache_dtype float32."
                )

    def __call__(self, data: Sequence, transform, cache_rate: float = 1.0, num_workers: int | None = 1, **kwargs):
        from monai.data import CacheDataset, PersistentDataset
        from monai.data.utils import pickle_hashing

        per_case = case_bytes(self.case_shape, self.image_channels, self.label_channels, self.cache_dtype)
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)
            free, needed = _free_disk(self.cache_dir), len(data) * per_case
            logger.info(f"training cache on disk in {self.cache_dir}: about {_gb(needed)}, {_gb(free or 0)} free.")
            if free is not None and needed > free:
                raise OSError(
                    f"the training cache needs about {_gb(needed)} in cache_dir '{self.cache_dir}', which has "
                    f"{_gb(free)} free: set --cache_dir to a larger disk, or --cache_dtype uint8 or float16."
                )
            # the transform's hash names the files, so a changed crop, normalisation or dtype is never read stale
            return PersistentDataset(data, transform, cache_dir=self.cache_dir, hash_transform=pickle_hashing)
        cases = min(len(data), int(len(data) * float(cache_rate)))  # as CacheDataset counts them
        check_cache_memory(
            cases, self.case_shape, self.image_channels, self.label_channels, self.cache_dtype, self.fraction
        )
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, **kwargs)


def cached_item_bytes(item: Mapping) -> int:
    """Bytes the tensors and arrays of one cached item hold (to measure what :func:`case_bytes` estimates)."""
    total = 0
    for value in item.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
    return total
