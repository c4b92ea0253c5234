"""Finding cases on disk, and the one function that names a case (BraTS 2013-2021 and ISIC 2017 layouts).

Two layouts are recognised anywhere under ``dataset_dir``:

* BraTS 2013/2015, ITK MetaImage, one folder per modality::

      <...>/HGG/<subject>/VSD.Brain.XX.O.MR_Flair.<id>/VSD.Brain.XX.O.MR_Flair.<id>.mha
      <...>/HGG/<subject>/VSD.Brain_3more.XX.O.OT.<id>/VSD.Brain_3more.XX.O.OT.<id>.mha

  likewise ``MR_T1``, ``MR_T1c`` and ``MR_T2``; the label folder may also be ``VSD.Brain_2more``.
* BraTS 2018-2021, NIfTI, one folder per case: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``
  (``t1ce`` is called ``t1c`` here). This is also the layout of the synthetic demo data (``bundle.demo``).

Every case found has the form::

    {"image": [t1, t1c, t2, flair], "label": seg, "case": "<case id>", "grade": "HGG" | "LGG" | None}

with the images always in :data:`bundle.constants.MODALITIES` order and paths relative to ``dataset_dir``
(posix separators), so a datalist file can move with the data. The grade comes from an ``HGG``/``LGG``
folder above the case (BRATS 2013/2015, BraTS 2018/2019); later releases have none.

2D images with masks (the ISIC 2017 skin-lesion layout of the SegAN ISIC re-implementation report, or a folder of
images beside a folder of
same-named masks) are found by :func:`find_image_pairs`, one item ``{"image", "label", "case"}`` per image.

:func:`case_id` is what every output file of a case is named after: datalists, saved label maps, report rows
and figure titles all call it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .constants import MODALITIES, strip_image_suffix

logger = logging.getLogger(__name__)

__all__ = [
    "GRADES",
    "LAYOUTS_SEARCHED",
    "NIFTI_PATTERN",
    "check_dataset_dir",
    "find_cases",
    "case_id",
    "IMAGE_2D_SUFFIXES",
    "ISIC_SPLITS",
    "LAYOUTS_2D",
    "find_image_pairs",
    "images_in",
    "loaded_from",
    "skipped_summary",
    "is_case_file",
]

#: Grade folder names, in the order the per-grade split visits them (cases without a grade come last).
GRADES = ("HGG", "LGG")

# BraTS 2013/2015: the modality is the token before the numeric id, e.g. "VSD.Brain.XX.O.MR_T1c.54513.mha".
# "MR_T1c" is listed before "MR_T1" and the token must end at a dot, so the two are never confused.
_MHA_PATTERN = re.compile(r"\.(MR_T1c|MR_T1|MR_T2|MR_Flair|OT)\.[^.]+\.mha$", re.IGNORECASE)
_MHA_NAMES = {"mr_t1": "t1", "mr_t1c": "t1c", "mr_t2": "t2", "mr_flair": "flair", "ot": "label"}
# A modality folder such as "VSD.Brain.XX.O.MR_Flair.54512": the case is the folder above it.
_MHA_FOLDER_PATTERN = re.compile(r"^VSD\.Brain", re.IGNORECASE)

#: BraTS 2018-2021 "<case>_<suffix>.nii.gz" (t1, t1ce, t2, flair, seg; also t1c, t1gd) and BraTS 2023+
#: "<case>-<suffix>.nii.gz" (t1n, t1c, t2w, t2f, seg); the suffix must be followed by ".nii", so "_t1" never eats
#: "_t1ce". The label values of BraTS 2023+ are another convention: train and infer with --label_convention brats2023.
NIFTI_PATTERN = re.compile(
    r"^(?P<case>.+)[_-](?P<suffix>t1ce|t1gd|t1c|t1n|t1|t2w|t2f|t2|flair|seg)\.nii(?:\.gz)?$", re.IGNORECASE
)
_NIFTI_NAMES = {
    "t1": "t1",
    "t1n": "t1",
    "t1ce": "t1c",
    "t1c": "t1c",
    "t1gd": "t1c",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "seg": "label",
}

#: The layouts :func:`find_cases` knows, for error messages.
LAYOUTS_SEARCHED = (
    "BraTS 2013/2015 MetaImage (<subject>/VSD.Brain.XX.O.MR_{T1,T1c,T2,Flair}.<id>/*.mha with label "
    "VSD.Brain_3more.XX.O.OT.<id>/*.mha), BraTS 2018-2021 NIfTI (<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz) and "
    "BraTS 2023+ NIfTI (<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz)"
)


def is_case_file(name: str) -> bool:
    """Whether a file called ``name`` is one :func:`find_cases` reads (a BraTS modality or label file)."""
    return bool(_MHA_PATTERN.search(name) or NIFTI_PATTERN.match(name))


def check_dataset_dir(dataset_dir) -> Path:
    """``dataset_dir`` as a ``Path`` if it is an existing folder; otherwise an error saying what to pass."""
    if not dataset_dir:
        raise ValueError(
            "dataset_dir is empty: set it to the folder holding the BraTS data (e.g. --dataset_dir data/BRATS2015), "
            "or make demo data with: python scripts/make_demo_data.py --output_dir data/demo"
        )
    root = Path(dataset_dir)
    if not root.exists():
        raise FileNotFoundError(
            f"dataset_dir '{dataset_dir}' does not exist: pass --dataset_dir with the folder holding the BraTS "
            "data, or make demo data there with: python scripts/make_demo_data.py --output_dir <dataset_dir>"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir '{dataset_dir}' is a file, not a folder: point it at the data folder.")
    return root


def _grade_of(folder: Path, root: Path) -> str | None:
    """Grade from the nearest ``HGG``/``LGG`` folder between ``root`` and ``folder`` (``None`` if there is none)."""
    for part in reversed(folder.relative_to(root).parts):
        if part.upper() in GRADES:
            return part.upper()
    return None


def _scan(root: Path, skipped: dict[str, list[str]] | None = None) -> dict[tuple[str, str], dict]:
    """Group the modality files under ``root`` by case: ``(case folder, case id) -> {"files": {name: path}}``.

    Linked folders are followed (a folder of links to cases is a common way to pick a subset), each real
    folder once. What is not read is added to ``skipped`` (reason -> paths relative to ``root``).
    """
    groups: dict[tuple[str, str], dict] = {}
    skipped = {} if skipped is None else skipped
    visited: set[str] = set()

    def skip(reason: str, path: str) -> None:
        skipped.setdefault(reason, []).append(Path(path).relative_to(root).as_posix())

    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link back to a folder already scanned (or a link loop)
            skip("a link to a folder already scanned", folder)
            subfolders[:] = []
            continue
        visited.add(real)
        # skip hidden folders (e.g. the demo generator's half-written ".demo.tmp-*") and macOS archive debris
        for d in subfolders:
            if d.startswith(".") or d == "__MACOSX":
                skip("hidden or archive debris", os.path.join(folder, d))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith("."):
                skip("hidden", str(path))
                continue
            if not path.exists():
                skip("a link to nothing", str(path))
                continue
            match = _MHA_PATTERN.search(name)
            if match:
                modality = _MHA_NAMES[match.group(1).lower()]
                case_dir = path.parent.parent if _MHA_FOLDER_PATTERN.match(path.parent.name) else path.parent
                case = case_dir.name
            else:
                match = NIFTI_PATTERN.match(name)
                if not match:
                    skip("not a BraTS file name", str(path))
                    continue
                modality = _NIFTI_NAMES[match.group("suffix").lower()]
                case_dir, case = path.parent, match.group("case")
            group = groups.setdefault((str(case_dir), case), {"dir": case_dir, "files": {}})
            if modality in group["files"]:
                raise ValueError(
                    f"case '{case}' in '{case_dir}' has two {modality} files: '{group['files'][modality]}' and "
                    f"'{path}'. Remove one of them."
                )
            group["files"][modality] = path
    return _merge_split_folders(groups)


def _merge_split_folders(groups: dict[tuple[str, str], dict]) -> dict[tuple[str, str], dict]:
    """One case per folder when a folder's files share no name prefix but make one case together.

    The model zoo's test data names a case folder's files ``image_<s>_<modality>.nii.gz`` and
    ``label_<s>_seg.nii.gz``: grouped by prefix they would be an image-only and a label-only "case". When the
    groups of one folder hold no modality twice, they are one case, named after the folder. A flat folder of
    several cases (each modality once per case) is left as it is.
    """
    by_dir: dict[str, list[tuple[str, str]]] = {}
    for key in groups:
        by_dir.setdefault(key[0], []).append(key)
    for folder, keys in by_dir.items():
        if len(keys) < 2:
            continue
        modalities = [m for key in keys for m in groups[key]["files"]]
        if len(modalities) != len(set(modalities)):
            continue
        merged = {"dir": groups[keys[0]]["dir"], "files": {}}
        for key in keys:
            merged["files"].update(groups.pop(key)["files"])
        groups[(folder, Path(folder).name)] = merged
    return groups


def find_cases(dataset_dir, require_label: bool = True) -> list[dict]:
    """Find every BraTS case under ``dataset_dir`` (searched recursively, hidden folders skipped).

    Args:
        dataset_dir: root folder of a BraTS release, or any folder above it.
        require_label: keep only cases with a ground-truth label (training/validation). With ``False`` the
            cases without one (e.g. the BRATS 2015 test subjects) are included too, without a ``"label"`` key.

    Returns:
        datalist items ``{"image": [t1, t1c, t2, flair], "label", "case", "grade"}`` sorted by case id, paths
        relative to ``dataset_dir`` with posix separators.

    Raises:
        FileNotFoundError: ``dataset_dir`` is missing, or holds no case in a known layout.
        ValueError: a case lacks one of the four modalities (the message names the case and the modality).
    """
    root = check_dataset_dir(dataset_dir)
    skipped: dict[str, list[str]] = {}
    groups = _scan(root, skipped)
    if not groups:
        raise FileNotFoundError(f"no BraTS case found under '{dataset_dir}'. Layouts searched: {LAYOUTS_SEARCHED}.")

    cases, unlabelled = [], 0
    for (_, case), group in groups.items():
        files = group["files"]
        missing = [m for m in MODALITIES if m not in files]
        if missing:
            raise ValueError(
                f"case '{case}' in '{group['dir']}' is missing modality {', '.join(missing)} "
                f"(found: {', '.join(sorted(files)) or 'nothing'}). SegAN needs all of {', '.join(MODALITIES)}: "
                "restore the missing file(s) or move the case out of dataset_dir."
            )
        if "label" not in files:
            unlabelled += 1
            if require_label:
                skip_case = group["dir"].relative_to(root).as_posix()
                skipped.setdefault("a case without a label", []).append(skip_case)
                continue
        item = {"image": [files[m].relative_to(root).as_posix() for m in MODALITIES]}
        if "label" in files:
            item["label"] = files["label"].relative_to(root).as_posix()
        item["case"] = case
        item["grade"] = _grade_of(group["dir"], root)
        cases.append((item, group["dir"].relative_to(root).as_posix()))

    if not cases:
        raise FileNotFoundError(
            f"none of the {unlabelled} case(s) under '{dataset_dir}' has a label (OT .mha or *_seg.nii.gz): "
            "training needs labelled cases; point dataset_dir at the training data."
        )
    # a case id seen twice (e.g. one subject in two copies of a release) is replaced by its folder path,
    # so that case ids stay unique and the split stays unambiguous
    seen: dict[str, int] = {}
    for item, _ in cases:
        seen[item["case"]] = seen.get(item["case"], 0) + 1
    for item, case_dir in cases:
        if seen[item["case"]] > 1:
            item["case"] = case_dir
    labelled = sum("label" in item for item, _ in cases)
    logger.info(f"found {len(cases)} case(s) under '{dataset_dir}' ({labelled} with a label)")
    if skipped:
        logger.warning(f"skipped under '{dataset_dir}': {skipped_summary(skipped)}")
    return sorted((item for item, _ in cases), key=lambda item: (item["case"], item["image"][0]))


def skipped_summary(skipped: Mapping[str, list[str]], shown: int = 5) -> str:
    """One line listing what a scan skipped, by reason: ``2 hidden (.a, .b); 1 not a BraTS file name (x.png)``."""
    parts = []
    for reason, paths in skipped.items():
        listed = ", ".join(paths[:shown]) + (f", ... ({len(paths) - shown} more)" if len(paths) > shown else "")
        parts.append(f"{len(paths)} {reason} ({listed})")
    return "; ".join(parts)


def loaded_from(image: Any, meta: Mapping | None = None) -> Any:
    """The file name(s) a loaded (Meta)Tensor came from (its ``filename_or_obj``), from its ``meta`` or a
    ``<key>_meta_dict`` given as ``meta``; ``None`` if unknown."""
    meta = getattr(image, "meta", None) or meta or {}
    return meta.get("filename_or_obj") if isinstance(meta, Mapping) else None


def case_id(item: Any, case_key: str = "case", image_key: str = "image") -> str | None:
    """The id of a case: what its output files, report rows and figure rows are named after.

    ``item`` is a datalist item or a loaded (decollated) one. Its ``item[case_key]`` wins; otherwise the id
    comes from its image file(s), given as paths or recorded in the loaded image's ``filename_or_obj``:

    * a list of modality files is named as :func:`find_cases` names them (``<case>`` of
      ``<case>_t1.nii.gz``; the subject folder of a BRATS 2013/2015 ``VSD.Brain...`` file; otherwise the
      folder holding the first file);
    * a single (4D) file is named after its file name without its extension.

    ``item`` may also be the image entry itself (a path or a list of paths). Returns ``None`` when there is
    nothing to name the case after.
    """
    if isinstance(item, Mapping):
        if item.get(case_key) is not None and str(item[case_key]):
            return str(item[case_key])
        image = item.get(image_key)
        files = image if isinstance(image, (str, os.PathLike, list, tuple)) else None
        files = files or loaded_from(image, item.get(f"{image_key}_meta_dict"))
    else:
        files = item
    if isinstance(files, (list, tuple)):
        if not files:
            raise ValueError("a case has an empty 'image' list: give each case its modality files.")
        first = Path(str(files[0]))
        match = NIFTI_PATTERN.match(first.name)
        if match:
            return match.group("case")
        if _MHA_PATTERN.search(first.name) and _MHA_FOLDER_PATTERN.match(first.parent.name):
            return first.parent.parent.name
        return first.parent.name
    if not isinstance(files, (str, os.PathLike)) or not str(files):
        return None
    name = os.path.basename(str(files))
    stem = strip_image_suffix(name)
    return stem if stem != name else os.path.splitext(name)[0]


# --- 2D images with masks: the ISIC 2017 skin-lesion layout (the SegAN ISIC re-implementation report), or any image
# folder beside a mask folder ---

#: File extensions of 2D images and masks.
IMAGE_2D_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: ISIC 2017 folder name of each datalist section: ``ISIC-2017_<Split>_Data`` and ``ISIC-2017_<Split>_Part1_GroundTruth``
#: (the test set was released as ``ISIC-2017_Test_v2_Data``: a version suffix is allowed).
ISIC_SPLITS = {"training": "Training", "validation": "Validation", "testing": "Test"}
_ISIC_SECTIONS = {split: section for section, split in ISIC_SPLITS.items()}
_ISIC_DATA_FOLDER = re.compile(r"^ISIC-2017_(?P<split>Training|Validation|Test)(?P<version>_v\d+)?_Data$")
# a mask is named like its image, possibly with one of these endings (ISIC: "_segmentation")
_MASK_ENDINGS = ("_segmentation", "_mask", "_label", "_seg", "")
# a folder of masks beside a folder of images (generic layout)
_MASK_FOLDER = re.compile(r"mask|label|groundtruth|ground_truth|segmentation", re.IGNORECASE)
#: The 2D layouts :func:`find_image_pairs` knows, for error messages.
LAYOUTS_2D = (
    "ISIC 2017 (ISIC-2017_{Training,Validation,Test}_Data/ISIC_<id>.jpg with masks in "
    "ISIC-2017_<split>_Part1_GroundTruth/ISIC_<id>_segmentation.png), or a folder of 2D images beside a folder of "
    "same-named masks (e.g. images/ and masks/)"
)


def images_in(folder: Path) -> list[Path]:
    """2D image files directly in ``folder``, sorted; hidden files and ISIC's ``*_superpixels.png`` skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_2D_SUFFIXES
        and not p.stem.lower().endswith("_superpixels")
    )


def _pair(images: list[Path], mask_folder: Path | None, root: Path, require_label: bool) -> list[dict]:
    """Datalist items ``{"image", "label", "case"}`` for ``images``, each with its same-named mask when there is one."""
    masks = {p.stem.lower(): p for p in images_in(mask_folder)} if mask_folder and mask_folder.is_dir() else {}
    items = []
    for image in images:
        mask = next((masks[k] for k in (image.stem.lower() + e for e in _MASK_ENDINGS) if k in masks), None)
        if mask is None and require_label:
            continue
        item = {"image": image.relative_to(root).as_posix(), "case": image.stem}
        if mask is not None:
            item["label"] = mask.relative_to(root).as_posix()
        items.append(item)
    return items


def find_image_pairs(dataset_dir, require_label: bool = True) -> dict[str, list[dict]] | None:
    """2D images with their masks under ``dataset_dir``, by datalist section, or ``None`` if it holds no 2D layout.

    * ISIC 2017: each of ``ISIC-2017_{Training,Validation,Test}_Data`` present (``Test_v2`` as released) gives
      the section ``training``, ``validation`` or ``testing``, the masks read from the matching
      ``..._Part1_GroundTruth`` folder;
    * otherwise, a folder of masks (its name holds ``mask``, ``label``, ``groundtruth`` or ``segmentation``)
      beside one folder of images gives one section, ``training``, to be split.

    Items are ``{"image": <file>, "label": <mask>, "case": <image name without extension>}`` with paths
    relative to ``dataset_dir``; with ``require_label=False`` images without a mask are kept, without ``"label"``.
    """
    root = check_dataset_dir(dataset_dir)
    sections = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _ISIC_DATA_FOLDER.match(folder.name)
        if match:
            split, version = match.group("split"), match.group("version") or ""
            truth = root / f"ISIC-2017_{split}{version}_Part1_GroundTruth"
            sections[_ISIC_SECTIONS[split]] = _pair(images_in(folder), truth, root, require_label)
    if sections:
        return sections
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    mask_folders = [p for p in folders if _MASK_FOLDER.search(p.name)]
    image_folders = [p for p in folders if p not in mask_folders and images_in(p)]
    if len(mask_folders) == 1 and len(image_folders) == 1:
        return {"training": _pair(images_in(image_folders[0]), mask_folders[0], root, require_label)}
    return None
