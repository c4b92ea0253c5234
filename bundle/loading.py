"""Loading one case with the checks a user's data needs: every file readable, finite, of the dimensionality
the config declares, and every modality on the same grid, each failure naming the case and file
(``LoadCaseImaged``, a MONAI ``LoadImaged``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, LoadImaged
from monai.utils import ensure_tuple

__all__ = ["LoadCaseImaged"]


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
