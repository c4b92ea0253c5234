"""Loading one case with the checks a user's data needs: every file readable, finite, of the dimensionality
the config declares, every modality and the label on the same grid (shape and affine), and every modality
carrying a signal, each failure naming the case and file (``LoadCaseImaged``, a MONAI ``LoadImaged``).
Modalities stored on different grids are resampled onto one reference modality by their affines, when the
config names one (``reference_modality``)."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, LoadImaged, ResampleToMatch
from monai.utils import ensure_tuple

from .geometry import without_rounding_noise

logger = logging.getLogger(__name__)

__all__ = ["LoadCaseImaged"]


class LoadCaseImaged(LoadImaged):
    """``LoadImaged`` for one case, whose every failure names the case, the file and what to do.

    MONAI's loader reports a damaged file as a bare ``EOFError``, modalities on different grids as a shape
    mismatch with no file named, and a 2D or 5D image only later, as an unrelated shape error. This loader
    also refuses what would silently spoil a run: NaN or infinite voxels (a NaN loss in training, an empty
    segmentation at inference) and keys of one case on different grids (an image and its label).

    Every case must be 3D: one 3D file per modality, or one 4D file (modalities last). A failed load is
    diagnosed file by file (on the error path only, so a good case is read once).

    One check per kind of fault, for every workflow (training, inference, evaluation):

    * **grid**: every key loaded here, and every image of the case loaded before (evaluation loads the label
      first), must have the same spatial shape and the same affine (within ``affine_tolerance``): a label
      stored flipped, or modalities with different affines, are named with both files and both affines
      instead of being compared voxel by voxel;
    * **modalities on different grids** (another shape, voxel size, orientation or field of view, as clinical
      series of one session are stored) are resampled (trilinear) onto the grid of ``reference_modality`` by
      their affines, which then is the case's grid (its label's, and the grid predictions are written on).
      Only files that do not overlap the reference in space are refused, naming both. Modalities already on
      one grid are loaded as before, at no extra cost; without ``reference_modality`` they are refused;
    * **trailing singleton axes** of NIfTI files are squeezed before channels are counted, so modality files
      shaped (X, Y, Z, 1), as some converters write them, stack as modalities, not as one 4D (MSD) case;
    * **signal**: each channel of ``signal_keys`` (the image) must vary over the head (its nonzero voxels): a
      constant or empty modality would give an empty segmentation with exit status 0. ``allow_constant``
      (the configs' ``allow_constant_modality``) lets such a case through.

    Args:
        keys: the keys to load, e.g. ``["image", "label"]``.
        case_key: item key holding the case id, for messages.
        spatial_dims: the spatial dimensions each key must have.
        signal_keys: the keys whose every channel must carry a signal (images, not labels).
        allow_constant: let a constant or empty modality through.
        affine_tolerance: largest difference (mm, or direction cosine) allowed between two affines of a case.
        modality_names: the modality of each file of a multi-file key, in order (the configs' ``image_modalities``).
        reference_modality: the modality whose grid the others are resampled onto when they differ (e.g.
            ``"t1c"``); ``None`` refuses modalities on different grids.
        kwargs: other ``LoadImaged`` arguments (``image_only``, ``ensure_channel_first``, ``reader``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        case_key: str = "case",
        spatial_dims: int = 3,
        signal_keys: KeysCollection = ("image",),
        allow_constant: bool = False,
        affine_tolerance: float = 1e-3,
        modality_names: Sequence[str] | None = None,
        reference_modality: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(keys, **kwargs)
        self.modality_names = [str(m).lower() for m in modality_names] if modality_names else None
        self.reference_modality = str(reference_modality).lower() if reference_modality else None
        if self.reference_modality and self.modality_names and self.reference_modality not in self.modality_names:
            raise ValueError(
                f"`reference_modality` is {reference_modality!r}, which is not among the modalities of a case's files "
                f"{self.modality_names} (`image_modalities`): set --reference_modality to one of them."
            )
        self._reader = kwargs.get("reader")
        self.case_key = case_key
        self.spatial_dims = int(spatial_dims)
        self.signal_keys = set(ensure_tuple(signal_keys))
        self.allow_constant = bool(allow_constant)
        self.affine_tolerance = float(affine_tolerance)
        if kwargs.get("reader") is None:  # picked first for .nii/.nii.gz; other formats keep MONAI's readers
            self._loader.register(_TrailingSingletonsSqueezed())

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
            d = self._load_onto_reference(data, reader)
            if d is None:
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
            files = [str(f) for f in ensure_tuple(data[key])]
            self._check_finite(d, key, files)
            if key in self.signal_keys and not self.allow_constant:
                self._check_signal(d, key, files)
        # images of this case loaded by an earlier transform (evaluation loads the label first)
        earlier = {
            k: tuple(int(v) for v in np.asarray(v.meta["spatial_shape"]).tolist())
            for k, v in d.items()
            if k not in shapes and hasattr(v, "meta") and "spatial_shape" in v.meta and "filename_or_obj" in v.meta
        }
        if len(set(shapes.values()) | set(earlier.values())) > 1:
            names = {k: _quoted(data[k]) for k in shapes}
            names.update({k: _quoted(d[k].meta["filename_or_obj"]) for k in earlier})
            listed = "; ".join(f"{k} {names[k]}: {shape}" for k, shape in {**shapes, **earlier}.items())
            raise ValueError(
                f"{self._case(d)}: its files are on different grids ({listed}). An image and its label must have the "
                "same shape: resample them to one grid, or remove the case."
            )
        self._check_affines(d, [*shapes, *earlier])
        return d

    def _load_onto_reference(self, data: Mapping, reader=None) -> dict | None:
        """The case with each multi-file key's files resampled onto its ``reference_modality`` file; ``None``
        when that does not apply (no reference, files that do not load or are not 3D, files on one grid), so
        the load error is diagnosed as before. Runs only after the usual load failed: a case on one grid never
        comes here."""
        if not self.reference_modality:
            return None
        single = LoadImage(reader=self._reader, image_only=True, ensure_channel_first=True)
        if self._reader is None:
            single.register(_TrailingSingletonsSqueezed())
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            files = [str(f) for f in ensure_tuple(data[key])]
            if len(files) > 1:
                if not self.modality_names or len(files) != len(self.modality_names):
                    return None
                try:
                    images = [single(f) for f in files]
                except Exception:
                    return None
                if any(image.ndim != 4 for image in images) or _on_one_grid(images):
                    return None
                loaded = self._stack_onto_reference(data, files, images)
            else:
                loaded = self._loader(data[key], reader)
            if self._loader.image_only:
                d[key] = loaded
            else:  # as LoadImaged keeps the meta data
                d[key], d[meta_key or f"{key}_{meta_key_postfix}"] = (loaded, loaded.meta) if len(files) > 1 else loaded
        return d

    def _stack_onto_reference(self, data: Mapping, files: list[str], images: list[MetaTensor]) -> MetaTensor:
        """(C, X, Y, Z) of the modality ``images`` (each (1, X, Y, Z)), resampled onto the reference's grid."""
        index = self.modality_names.index(self.reference_modality)
        reference = images[index]
        low, high = _world_box(reference)
        channels = []
        for file, image in zip(files, images):
            if image is not reference and not _on_one_grid([image, reference]):
                other_low, other_high = _world_box(image)
                if (np.minimum(high, other_high) <= np.maximum(low, other_low)).any():
                    raise ValueError(
                        f"{self._case(data)}: '{file}' does not overlap '{files[index]}' (its reference_modality, "
                        f"{self.reference_modality}) in space: world boxes {_box_text(other_low, other_high)} and "
                        f"{_box_text(low, high)} mm, so it cannot be resampled onto that grid. Check that both files "
                        "are of this case and session and that their headers (affines) are right, or remove the case."
                    )
                logger.info(f"{self._case(data)}: '{file}' resampled onto the grid of '{files[index]}'")
                image = without_rounding_noise(ResampleToMatch(mode="bilinear", padding_mode="zeros")(image, reference))
            channels.append(torch.as_tensor(image))
        meta = dict(reference.meta)
        meta["original_channel_dim"] = 0  # stacked on a new first axis, as MONAI stacks a list of files
        meta["filename_or_obj"] = files[index]  # the grid, and the header, the case's outputs are written with
        return MetaTensor(torch.cat(channels), meta=meta)

    def _check_affines(self, d: Mapping, keys: list) -> None:
        """Every image of the case in one space: the same affine (the shapes are checked already)."""
        affines = {k: np.asarray(d[k].meta["original_affine"], dtype=float) for k in keys if _affine_known(d[k])}
        if len(affines) < 2:
            return
        (first, reference), *others = affines.items()
        for key, affine in others:
            if not np.allclose(affine, reference, rtol=0, atol=self.affine_tolerance):
                raise ValueError(
                    f"{self._case(d)}: {_quoted(d[first].meta['filename_or_obj'])} and "
                    f"{_quoted(d[key].meta['filename_or_obj'])} have the same shape but different affines (largest "
                    f"difference {np.abs(affine - reference).max():.4g}):\n{first}: {_affine_text(reference)}\n"
                    f"{key}: {_affine_text(affine)}\nTheir voxels are not the same places (e.g. a label stored "
                    "flipped): resample the label onto the image's grid (nearest neighbour), or remove the case."
                )

    def _check_signal(self, d: Mapping, key: Hashable, files: list[str]) -> None:
        """Refuse a modality that is constant over the head (its nonzero voxels), or empty."""
        image = torch.as_tensor(d[key])
        channel_dim = _channel_dim(d[key], self._loader.ensure_channel_first)
        channels = [image] if channel_dim is None else list(torch.unbind(image, channel_dim))
        for c, channel in enumerate(channels):
            flat = channel.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]  # two distinct nonzero values settle it at once
            sample = sample[sample != 0]
            if sample.numel() and bool(sample.min() < sample.max()):
                continue
            low, high = torch.aminmax(flat)
            value = high if bool(high != 0) else low
            if not bool(((flat == 0) | (flat == value)).all()):
                continue
            head = flat[flat != 0]
            what = (
                "empty (every voxel is 0)"
                if not head.numel()
                else (f"constant over the head (its {head.numel()} nonzero voxel(s) all {float(head[0]):g})")
            )
            where = _quoted(files)
            if len(files) == len(channels) > 1:
                where = f"'{files[c]}'"
            elif len(channels) > 1:
                where = f"{where} (channel {c})"
            raise ValueError(
                f"{self._case(d)}: {where} is {what}: the network would see no signal in it and segment nothing. "
                "Check the file (e.g. a failed conversion or export), or set --allow_constant_modality true to run "
                "the case anyway."
            )

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
        single.register(_TrailingSingletonsSqueezed())
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
            affines = {f: np.asarray(single(f).affine, dtype=float) for f in files} if len(files) > 1 else {}
            reference = affines.get(files[0])
            for file, affine in affines.items():
                if not np.allclose(affine, reference):  # MONAI's own test when it stacks the files
                    raise ValueError(
                        f"{case}: modality files '{files[0]}' and '{file}' have the same shape but different affines "
                        f"(largest difference {np.abs(affine - reference).max():.4g}):\n'{files[0]}': "
                        f"{_affine_text(reference)}\n'{file}': {_affine_text(affine)}\nAll modalities of a case must "
                        "be in one space: resample them onto one grid (e.g. the T1c's), or remove the case."
                    ) from error
        files = [str(f) for key in self.key_iterator(dict(data)) for f in ensure_tuple(data[key])]
        raise ValueError(f"{case}: loading {files} failed: {type(error).__name__}: {error}") from error


def _quoted(files) -> str:
    return ", ".join(f"'{f}'" for f in ensure_tuple(files))


class _TrailingSingletonsSqueezed(NibabelReader):
    """``NibabelReader`` that drops trailing singleton axes past the third: a 3D volume stored as (X, Y, Z, 1)
    or (X, Y, Z, 1, 1) is read as (X, Y, Z), so it counts as one modality, not as a 4D file of one channel."""

    def _get_array_data(self, img, filename):
        data = super()._get_array_data(img, filename)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return data


def _on_one_grid(images: Sequence[MetaTensor]) -> bool:
    """Whether channel-first ``images`` have one spatial shape and one affine (MONAI's test when it stacks)."""
    first = images[0]
    return all(
        image.shape[1:] == first.shape[1:] and np.allclose(np.asarray(image.affine), np.asarray(first.affine))
        for image in images[1:]
    )


def _world_box(image: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest world coordinates (mm) of a channel-first image's voxels, their edges included."""
    shape = np.asarray(image.shape[1:], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(len(shape), -1)
    world = np.asarray(image.affine, dtype=float)[:3, :3] @ corners + np.asarray(image.affine, dtype=float)[:3, 3:]
    return world.min(1), world.max(1)


def _box_text(low: np.ndarray, high: np.ndarray) -> str:
    return "[" + ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(low, high)) + "]"


def _affine_known(image) -> bool:
    return hasattr(image, "meta") and image.meta.get("original_affine") is not None and "filename_or_obj" in image.meta


def _affine_text(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine), precision=4, suppress_small=True, separator=", ").replace("\n", "")


def _channel_dim(image, channel_first: bool) -> int | None:
    """The channel axis of a loaded image: 0 when made channel-first, else its reader's ``original_channel_dim``."""
    if channel_first:
        return 0
    channel_dim = str(getattr(image, "meta", {}).get("original_channel_dim", "no_channel"))
    return None if channel_dim in ("nan", "no_channel") else int(channel_dim) % image.ndim
