"""Axial slice sampling for training: many random 2D patches from each cached 3D volume (Xue et al. 2018, section 3).

SegAN trains on axial slices, each a random in-plane crop (160x160 of the 180x180 centre crop). The bundle caches
each normalised volume once and draws ``num_samples`` slices per visit. MONAI's ``RandSpatialCropSamplesd``
(with a ``[h, w, 1]`` ROI, then ``SqueezeDimd`` and ``EnsureTyped``) does this, but pays for every slice in
per-transform bookkeeping (a ``MetaTensor`` round trip, tracing, dtype checks): on one CPU thread the training
loader reached about 230-330 slices/s, almost all of it overhead. :class:`RandAxialSlicesd` draws the same
patches with the same random numbers (so a seeded training run is unchanged) and cuts each with one indexing
operation. Volumes stored in a smaller type by ``bundle.memory.CacheDtyped`` (``cache_dtype`` float16 or uint8) are
restored to float32 patch by patch, so the cache stays small.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED, ensure_tuple_rep

from .memory import ENCODING, restore

__all__ = ["RandAxialSlicesd"]


def _plain(volume) -> torch.Tensor:
    """The tensor under a ``MetaTensor`` (no metadata tracking per slice), or ``volume`` as a tensor."""
    return volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)


class RandAxialSlicesd(Randomizable, MapTransform):
    """``num_samples`` random axial patches ``(C, h, w)`` of channel-first volumes, as a list of dicts.

    Every key gets the same patch (image and label stay aligned). The patch corners are drawn exactly as
    ``RandSpatialCropSamplesd(roi_size=[h, w, 1], random_size=False)`` draws them (one sub-seed from this
    transform's random state per call, then a corner per sample, axes whose size equals the patch's taking 0),
    so the two give identical batches for one seed; the output has no slice dimension and is ``dtype``, as
    after ``SqueezeDimd(dim=-1)`` and ``EnsureTyped(dtype=dtype, track_meta=False)``. Each patch is a copy, so
    a later in-place transform cannot change the cached volume. Keys not listed are shared with the input dict.
    A volume stored by ``bundle.memory.CacheDtyped`` (its encoding in ``<key>_encoding``) is restored per
    patch (:func:`bundle.memory.restore`), and the encoding entries are left out of the patches.

    Volumes are ``(C, H, W, D)`` (``slice_dim=3``) or ``(C, D, H, W)`` (``slice_dim=1``). The second layout, made
    once before caching with ``Transposed(indices=[0, 3, 1, 2])``, keeps each axial slice contiguous in memory, so
    a patch is read row by row instead of one float every ``D``: about 17x cheaper per patch for 128 slices.

    Args:
        keys: keys of the volumes to cut (e.g. ``["image", "label"]``).
        patch_size: in-plane patch size ``(h, w)`` (an int for a square).
        num_samples: patches per call.
        dtype: dtype of the patches (``torch.float32``).
        slice_dim: the axis of the axial slices, 3 for ``(C, H, W, D)`` volumes or 1 for ``(C, D, H, W)``.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int] | int,
        num_samples: int,
        dtype: torch.dtype = torch.float32,
        slice_dim: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.patch_size = tuple(int(s) for s in ensure_tuple_rep(patch_size, 2))
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples = int(num_samples)
        self.dtype = dtype
        if slice_dim not in (1, 3):
            raise ValueError(f"slice_dim must be 3 for (C, H, W, D) volumes or 1 for (C, D, H, W), got {slice_dim}.")
        self.slice_dim = slice_dim
        self.sub_seed = 0

    def randomize(self, data: None = None) -> None:
        self.sub_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def corners(self, spatial_size: Sequence[int]) -> list[tuple[int, int, int]]:
        """The ``(x, y, z)`` patch corners of one call, for a volume of ``spatial_size`` ``(H, W, D)``."""
        rng = np.random.RandomState(self.sub_seed)
        patch = (*self.patch_size, 1)
        valid = [min(p, s) for p, s in zip(patch, spatial_size)]
        return [
            tuple(int(rng.randint(0, s - p + 1)) if s > p else 0 for s, p in zip(spatial_size, valid))
            for _ in range(self.num_samples)
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        keys = list(self.key_iterator(dict(data)))
        volumes = {key: _plain(data[key]) for key in keys}
        for key, volume in volumes.items():
            if volume.ndim != 4:
                raise ValueError(
                    f"RandAxialSlicesd expects channel-first 3D volumes, got '{key}' of shape "
                    f"{tuple(volume.shape)}; 2D images need no slicing (see configs/isic.json)."
                )
        if len({tuple(v.shape[1:]) for v in volumes.values()}) > 1:
            shapes = {key: tuple(v.shape) for key, v in volumes.items()}
            raise ValueError(f"RandAxialSlicesd needs volumes of one spatial shape, got {shapes}.")
        self.randomize()
        if not volumes:
            return [dict(data) for _ in range(self.num_samples)]
        shape = tuple(next(iter(volumes.values())).shape[1:])
        spatial = shape if self.slice_dim == 3 else (shape[1], shape[2], shape[0])  # (H, W, D)
        h, w = (min(p, s) for p, s in zip(self.patch_size, spatial[:2]))
        encodings = {key: data.get(f"{key}{ENCODING}") for key in volumes}
        shared = {k: v for k, v in data.items() if not (isinstance(k, str) and k.endswith(ENCODING))}
        samples = []
        for x, y, z in self.corners(spatial):
            sample = dict(shared)
            for key, volume in volumes.items():
                patch = (
                    volume[:, x : x + h, y : y + w, z] if self.slice_dim == 3 else volume[:, z, x : x + h, y : y + w]
                )
                sample[key] = restore(patch, encodings[key], self.dtype)
            samples.append(sample)
        return samples
