"""Saving one prediction per case, under the case's name, never half-written (inference's last step).

:class:`SaveCaseImaged` is a ``monai.transforms.SaveImaged`` (so MONAI Label drops it from ``postprocessing``
like any other saver) that names the file after :func:`bundle.cases.case_id`, writes it through
:func:`bundle.files.atomic_path`, and writes a label map of a NIfTI input with that input's own header (any
valid affine, its sform/qform codes and units round-trip).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Mapping

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, SaveImaged
from monai.utils import ensure_tuple

from .cases import case_id, is_case_file, loaded_from
from .files import atomic_path

__all__ = ["SaveCaseImaged", "source_file", "refuse_overwriting_inputs"]


def source_file(image, meta_data: Mapping | None = None) -> str | None:
    """The file ``image`` was loaded from (the first one for a stacked multi-file case), if known."""
    name = loaded_from(image, meta_data)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else None


def _restore_spatial_units(path: str, source: str | None) -> None:
    """Give the NIfTI at ``path`` the spatial unit of ``source`` (millimetres for non-NIfTI sources).

    MONAI's NIfTI writer leaves ``xyzt_units`` unset ("unknown"), although MONAI's affines are in mm; a saved
    label map should carry its input's header, units included.
    """
    unit = "mm"
    if source and source.endswith((".nii", ".nii.gz")) and os.path.isfile(source):
        unit = nib.load(source).header.get_xyzt_units()[0]
        if unit == "unknown":
            return
    image = nib.load(path)
    image.header.set_xyzt_units(xyz=unit)
    data = np.asanyarray(image.dataobj)
    nib.save(nib.Nifti1Image(data, image.affine, header=image.header), path)


class SaveCaseImaged(SaveImaged):
    """Save one image per case as ``<output_dir>/<case>_<output_postfix><output_ext>``, never half-written.

    A ``monai.transforms.SaveImaged`` (so MONAI Label drops it from ``postprocessing`` like any other saver)
    with two differences that inference over many cases needs:

    * the file is named after the item's case id (:func:`bundle.cases.case_id`: ``data[case_key]``, e.g.
      ``"BraTS2021_00000"``, else named from its files), not after the first of its modality files.
      A case id with folders (``"HGG/brats_2013_pat0001_1"``) gives the same sub-folders under ``output_dir``.
    * the file is written under a hidden temporary name in the same folder and renamed when complete, so an
      interrupted or failed write leaves no partial file behind, and an earlier result is replaced whole.

    Args:
        keys: the one key to save, e.g. ``"pred"``.
        output_dir: folder of the files (created if missing).
        output_postfix: appended to the case id, e.g. ``"seg"``.
        output_ext: file extension, which picks the writer (``".nii.gz"``: NIfTI).
        case_key: item key holding the case id.
        kwargs: other ``SaveImaged`` arguments (``output_dtype``, ``resample``, ``writer``, ``meta_keys``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        case_key: str = "case",
        print_log: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            keys, output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext, print_log=False, **kwargs
        )
        if len(self.keys) != 1:
            raise ValueError(
                f"SaveCaseImaged saves one key, got {list(self.keys)}: use one transform per key, each with its "
                "own output_postfix."
            )
        self.output_dir = str(output_dir)
        self.output_postfix = str(output_postfix)
        self.output_ext = self.saver.output_ext
        self.case_key = case_key
        self.print_log = print_log
        self.logger = logging.getLogger(self.__class__.__name__)

    def case_name(self, data: Mapping, key: Hashable) -> str:
        """The case id naming ``data[key]``'s file: ``data[case_key]``, else from its file name(s)."""
        case = case_id(data, self.case_key, image_key=key)
        if not case:
            raise ValueError(
                f"SaveCaseImaged: the item has no '{self.case_key}' entry and '{key}' no file name to name the output "
                f"after; give each datalist item a '{self.case_key}'."
            )
        return case

    def output_path(self, data: Mapping, key: Hashable) -> str:
        """``<output_dir>/<case>_<output_postfix><output_ext>`` for this item."""
        case = self.case_name(data, key)
        if os.path.isabs(case) or ".." in case.replace("\\", "/").split("/"):
            raise ValueError(
                f"case id '{case}' would be saved outside output_dir '{self.output_dir}'; rename the case."
            )
        postfix = f"_{self.output_postfix}" if self.output_postfix else ""
        return os.path.join(self.output_dir, f"{case}{postfix}{self.output_ext}")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            meta_data = d.get(meta_key) if meta_key is not None else None
            path = self.output_path(d, key)
            source = source_file(d[key], meta_data)
            with atomic_path(path, self.output_ext) as tmp:
                if not self._save_like_source(d[key], source, tmp):
                    # MONAI's saver appends the extension itself
                    self.saver(img=d[key], meta_data=meta_data, filename=tmp[: -len(self.output_ext)])
                    if tmp.endswith((".nii", ".nii.gz")):
                        _restore_spatial_units(tmp, source)
            if self.print_log:
                self.logger.info(f"saved {path}")
        return d

    def _save_like_source(self, image, source: str | None, path: str) -> bool:
        """Write ``image`` (C, H, W, D) as a NIfTI with the header of the NIfTI it was segmented from.

        MONAI's NIfTI writer rebuilds the header from the affine: it fails on affines that permute the axes
        ("not invertible") and resets the sform/qform codes to (1, 1). A label map on its input's voxel grid
        can take the input's header as it is, so any valid input geometry round-trips, codes and units
        included. Returns ``False`` (nothing written) when that does not apply: a non-NIfTI output or source,
        or an image not on the source's grid.
        """
        nifti = (".nii", ".nii.gz")
        if not path.endswith(nifti) or not source or not source.endswith(nifti) or not os.path.isfile(source):
            return False
        reference = nib.load(source)
        array = np.asarray(torch.as_tensor(image).detach().cpu())
        if tuple(array.shape[1:]) != tuple(reference.shape[:3]):
            return False
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        dtype = self.saver.init_kwargs.get("output_dtype") or array.dtype
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)  # the source's intensity scaling and display range do not apply
        header["cal_min"], header["cal_max"] = 0, 0
        nib.save(nib.Nifti1Image(array.astype(dtype), None, header), path)
        return True


def _savers(transforms) -> list[SaveCaseImaged]:
    """The ``SaveCaseImaged`` transforms in ``transforms`` (a transform, a ``Compose`` or a list, nested)."""
    if isinstance(transforms, SaveCaseImaged):
        return [transforms]
    if isinstance(transforms, Compose):
        transforms = transforms.transforms
    if isinstance(transforms, (list, tuple)):
        return [saver for t in transforms for saver in _savers(t)]
    return []


def refuse_overwriting_inputs(items: Iterable[Mapping], postprocessing, dataset_dir: str = "") -> None:
    """Refuse, before any case runs, an output file that would overwrite or pose as an input.

    For every case and every ``SaveCaseImaged`` in ``postprocessing`` (none: nothing is written, nothing to
    check), the output path must not be

    * any input file of the run (an image or label of any case, links resolved), nor
    * inside ``dataset_dir`` under a name that is already a file there or that the case scan reads as data
      (``<case>_seg.nii.gz`` is a BraTS label): with ``--output_dir`` equal to a flat BraTS folder, inference
      would write its label maps over the ground truth, and a later evaluation would score them against
      themselves (Dice 1.000).

    The error names the output, the file it would replace and what to change. Called from the inference
    config's ``start_checks``.
    """
    savers = _savers(postprocessing)
    if not savers:
        return
    items = list(items)
    inputs = {}
    for item in items:
        for key in ("image", "label"):
            for file in ensure_tuple(item.get(key) or ()):
                if isinstance(file, (str, os.PathLike)):
                    inputs.setdefault(os.path.realpath(file), (item.get("case"), key))
    data_dir = os.path.realpath(dataset_dir) if dataset_dir and os.path.isdir(dataset_dir) else ""
    for item in items:
        for saver in savers:
            for key in saver.keys:
                out = os.path.realpath(saver.output_path(item, key))
                case = item.get("case")
                if out in inputs:
                    other, what = inputs[out]
                    raise ValueError(
                        f"the output of case '{case}', '{out}', is the {what} file of case '{other}': writing it would "
                        "destroy an input of this run. Set --output_dir to another folder (or another "
                        "--output_postfix)."
                    )
                inside = data_dir and out.startswith(data_dir + os.sep)
                name = os.path.basename(out)
                if inside and (os.path.exists(out) or is_case_file(name)):
                    what = "a name the case scan reads as data"
                    what = "a file that is already there" if os.path.exists(out) else what
                    raise ValueError(
                        f"the output of case '{case}', '{out}', would be written inside dataset_dir '{dataset_dir}' as "
                        f"{what} (e.g. a BraTS label, <case>_seg.nii.gz): it would overwrite the ground truth or be "
                        "taken for it by a later run. Set --output_dir to a folder outside dataset_dir."
                    )
