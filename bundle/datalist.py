"""Decathlon-style datalists for the three workflows: training, inference and evaluation (Xue et al. 2018, section 3:
9:1 per grade).

SegAN was trained and validated on BRATS 2015 (220 HGG + 54 LGG subjects) split 9:1 into training and
validation *separately for HGG and LGG* and then recombined (SegAN paper, section 4.1). This module makes
that split of the cases :func:`bundle.cases.find_cases` finds, and loads a datalist for each workflow:
:func:`load_datalist` for training, :func:`inference_datalist` (which also takes unlabelled cases, single 4D
multi-modality files as in MSD Task01 or MONAI Label, and folders of them) and :func:`evaluation_datalist`
(which checks that every case has a label). The last two give each item a unique ``"case"`` id
(:func:`bundle.cases.case_id`) that names its outputs.

k-fold cross-validation (``num_folds`` >= 2, ``fold``; :func:`fold_cases`) replaces the 9:1 split: the labelled
cases are dealt into ``num_folds`` folds per grade with a fixed seed, fold ``fold`` is the validation set and the
others the training set; the training records it in its split record like the 9:1 split (:func:`record_split`).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .cases import (
    GRADES,
    IMAGE_2D_SUFFIXES,
    LAYOUTS_2D,
    LAYOUTS_SEARCHED,
    NIFTI_PATTERN,
    case_id,
    check_dataset_dir,
    find_cases,
    find_image_pairs,
    images_in,
)
from .constants import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

__all__ = [
    "split_cases",
    "fold_cases",
    "check_folds",
    "build_datalist",
    "load_datalist",
    "inference_datalist",
    "evaluation_datalist",
    "record_split",
    "SPLIT_RECORD",
]

#: The split record a training writes beside its ``model.pt`` (:func:`record_split`).
SPLIT_RECORD = "datalist.json"
#: The seed of the cross-validation folds (:func:`fold_cases`): fixed, so fold ``i`` holds the same cases whatever
#: the training's ``seed``.
FOLD_SEED = 0

# a single-file (4D, channels last) multi-modality case, as in MSD Task01 or a MONAI Label datastore
_SINGLE_FILE_SUFFIXES = (".nii.gz", ".nii")
_HOW_TO_PREPARE = "write one with: python scripts/prepare_datalist.py --dataset_dir <data> --output <file.json>"


def _group_key(grade) -> tuple:
    return (GRADES.index(grade), "") if grade in GRADES else (len(GRADES), str(grade or ""))


def split_cases(cases: Sequence[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split cases into training and validation, separately per grade, then recombine (SegAN paper, section 4.1).

    Each grade group (HGG, LGG, then cases without a grade) is shuffled with its own generator seeded by
    ``seed`` and ``round(val_fraction * n)`` of its cases go to validation; a group of two or more cases
    always gives at least one validation case and keeps at least one training case (unless
    ``val_fraction`` is 0). The split depends only on the case ids, not on the input order.

    Returns:
        ``(training, validation)``, each sorted by case id.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    groups: dict[tuple, list[dict]] = {}
    for item in cases:
        groups.setdefault(_group_key(item.get("grade")), []).append(item)

    train, val = [], []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda item: (item["case"], str(item["image"])))
        n_val = int(math.floor(val_fraction * len(group) + 0.5))
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        order = list(range(len(group)))
        random.Random(int(seed)).shuffle(order)
        chosen = set(order[:n_val])
        for i, item in enumerate(group):
            (val if i in chosen else train).append(item)

    def by_case(item):
        return (item["case"], str(item["image"]))

    return sorted(train, key=by_case), sorted(val, key=by_case)


def _whole_number(value, key: str) -> int:
    """``value`` as an int (an integral float or a numeric string too), else a ``ValueError`` naming ``key``."""
    if not isinstance(value, bool):
        try:
            if isinstance(value, str):
                return int(value.strip())
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return operator.index(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{key} must be a whole number, got {value!r}.")


def check_folds(num_folds=0, fold=0) -> tuple[int, int]:
    """``(num_folds, fold)`` as ints, checked: ``num_folds`` 0 or 1 means no cross-validation (the 9:1 split,
    ``fold`` must stay 0); ``num_folds`` >= 2 needs ``0 <= fold < num_folds``. A bad value is a ``ValueError``
    naming its key."""
    k, i = _whole_number(num_folds, "num_folds"), _whole_number(fold, "fold")
    if k < 0:
        raise ValueError(
            f"num_folds must be 0 or 1 (no cross-validation: the 9:1 split) or the number of folds (>= 2), got {k}."
        )
    if k <= 1 and i != 0:
        raise ValueError(
            f"fold {i} was given but num_folds is {k} (no cross-validation): set num_folds to the number of folds "
            "(>= 2) to cross-validate, or leave fold at 0."
        )
    if k >= 2 and not 0 <= i < k:
        raise ValueError(f"fold must be in 0 .. num_folds - 1 = 0 .. {k - 1} (folds count from 0), got {i}.")
    return k, i


def _grade_name(key: tuple) -> str:
    return GRADES[key[0]] if key[0] < len(GRADES) else f"grade '{key[1]}'" if key[1] else "without a grade"


def fold_cases(
    cases: Sequence[dict], num_folds: int, fold: int, seed: int = FOLD_SEED
) -> tuple[list[dict], list[dict]]:
    """k-fold cross-validation split: ``(training, validation)`` of fold ``fold`` of ``num_folds``.

    Each grade group (HGG, LGG, then cases without a grade; as :func:`split_cases`) is sorted by case id, shuffled
    with its own generator seeded by ``seed`` and dealt round-robin into the folds, each group starting where the
    previous one stopped, so every fold holds ``floor`` or ``ceil(n / num_folds)`` cases of each grade and the folds
    differ in size by at most one case. Fold ``fold`` is the validation set, the other folds the training set: over
    ``fold = 0 .. num_folds - 1`` every case is validated exactly once. The folds depend only on the case ids and
    grades, not on the input order.

    Raises:
        ValueError: naming the key, when ``num_folds`` < 2, ``fold`` is not in ``0 .. num_folds - 1``, a grade has
            fewer cases than ``num_folds`` (a fold would lack it), or two items share a case id.

    Returns:
        ``(training, validation)``, each sorted by case id.
    """
    k, i = check_folds(num_folds, fold)
    if k < 2:
        raise ValueError(f"num_folds must be at least 2 to split cases into folds, got {k}.")
    groups: dict[tuple, list[dict]] = {}
    seen: set[str] = set()
    for item in cases:
        case = str(item.get("case") or case_id(item["image"]))
        if case in seen:
            raise ValueError(
                f"case '{case}' is listed twice, so it could be validated by a model that trained on it: give each "
                "case once (across the datalist's training and validation sections)."
            )
        seen.add(case)
        groups.setdefault(_group_key(item.get("grade")), []).append(item)
    small = [(len(group), key) for key, group in groups.items() if len(group) < k]
    if small:
        size, key = min(small)
        what = "cases" if len(groups) == 1 else f"{_grade_name(key)} cases"
        raise ValueError(
            f"num_folds {k} is larger than the number of {what} ({size}): every fold must hold out at least one "
            f"case of each grade; set num_folds to at most {min(len(g) for g in groups.values())}."
        )

    train, val, start = [], [], 0
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda item: (str(item.get("case") or ""), str(item["image"])))
        order = list(range(len(group)))
        random.Random(int(seed)).shuffle(order)
        for position, index in enumerate(order):
            (val if (start + position) % k == i else train).append(group[index])
        start += len(group)

    def by_case(item):
        return (str(item.get("case") or ""), str(item["image"]))

    return sorted(train, key=by_case), sorted(val, key=by_case)


def build_datalist(
    dataset_dir, val_fraction: float = 0.1, seed: int = 0, num_folds: int = 0, fold: int = 0
) -> dict[str, list[dict]]:
    """Labelled cases under ``dataset_dir`` as ``{"training": [...], "validation": [...]}`` (:func:`split_cases`).

    BraTS cases come first; a folder holding none is searched for 2D images with masks
    (:func:`bundle.cases.find_image_pairs`: ISIC 2017, or an image folder beside a mask folder): ISIC's own
    validation and test sets are kept (``validation``, ``testing``), and a layout without a validation set has
    its training images split 9:1. A folder holding both kinds is read as BraTS, the 2D images reported ignored.

    With ``num_folds`` >= 2 the 9:1 split is replaced by fold ``fold`` of a k-fold split (:func:`fold_cases`) of
    the labelled cases (for a 2D layout, its training and validation images together; ``testing`` is kept).
    """
    num_folds, fold = check_folds(num_folds, fold)
    cases, pairs = _layouts(dataset_dir, require_label=True)
    if cases:
        if num_folds >= 2:
            train, val = fold_cases(cases, num_folds, fold)
        else:
            train, val = split_cases(cases, val_fraction=val_fraction, seed=seed)
        return {"training": train, "validation": val}
    if pairs is not None:
        if not pairs.get("training"):
            raise FileNotFoundError(
                f"no training image with a mask under '{dataset_dir}'. Layouts searched: {LAYOUTS_2D}."
            )
        out = {k: v for k, v in pairs.items() if v}
        if num_folds >= 2:
            pool = out["training"] + out.get("validation", [])
            out["training"], out["validation"] = fold_cases(pool, num_folds, fold)
        elif "validation" not in out:
            out["training"], out["validation"] = split_cases(out["training"], val_fraction=val_fraction, seed=seed)
        return out
    find_cases(dataset_dir, require_label=True)  # raises, saying what was searched
    raise FileNotFoundError(f"no case found under '{dataset_dir}'. Layouts searched: {LAYOUTS_SEARCHED}.")


def _layouts(dataset_dir, require_label: bool) -> tuple[list[dict], dict[str, list[dict]] | None]:
    """``(BraTS cases, 2D sections)`` under ``dataset_dir``; when both are there, the 3D cases win (a BraTS folder
    may also hold screenshots and a folder called ``labels``) and the 2D layout is reported as ignored."""
    try:
        cases = find_cases(dataset_dir, require_label=require_label)
    except FileNotFoundError:
        cases = []
    pairs = find_image_pairs(dataset_dir, require_label=require_label)
    if cases and pairs is not None:
        listed = ", ".join(f"{section}: {len(items)} image(s)" for section, items in pairs.items())
        logger.warning(
            f"'{dataset_dir}' holds {len(cases)} BraTS case(s) and also 2D images in a 2D layout ({listed}): using the "
            "BraTS cases, ignoring the 2D images. Point --dataset_dir at the 2D images' folder to use them instead."
        )
        pairs = None
    return cases, pairs


def _resolve(path, base: Path, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expected a file path, got {path!r}.")
    full = Path(path) if os.path.isabs(path) else base / path
    full = Path(os.path.normpath(os.path.abspath(full)))
    if not full.is_file():
        raise FileNotFoundError(
            f"{where}: file '{full}' does not exist. Check dataset_dir (relative paths are resolved against "
            f"'{base}') or regenerate the datalist ({_HOW_TO_PREPARE})."
        )
    return str(full)


def load_datalist(data_list_file_path, dataset_dir, key: str = "training", num_folds=0, fold=0) -> list[dict]:
    """Items of one section of a datalist, with absolute paths, ready for a MONAI ``Dataset``.

    This is what ``configs/train.json`` calls for ``train#dataset#data`` and ``validate#dataset#data``.

    Args:
        data_list_file_path: a Decathlon-style JSON file; if empty (``None`` or ``""``) the datalist is built in
            memory from ``dataset_dir`` with :func:`build_datalist` (9:1 per-grade split, seed 0).
        dataset_dir: folder that relative paths are resolved against (if empty: the datalist file's folder,
            as in ``monai.data.load_decathlon_datalist``). Absolute paths are kept.
        key: section to return, e.g. ``"training"`` or ``"validation"``. A file with a ``training`` section but
            no ``validation`` one (a Decathlon ``dataset.json``) is split 9:1 with :func:`split_cases`.
        num_folds, fold: with ``num_folds`` >= 2, ``training`` and ``validation`` are fold ``fold`` of a k-fold split
            (:func:`fold_cases`, per grade, fixed seed) of the labelled cases: those of ``dataset_dir``, or the
            file's ``training`` and ``validation`` sections together (other sections, e.g. ``testing``, are kept).
            0 or 1 (the default): no cross-validation, the sections as described above.

    Returns:
        a list of items whose ``"image"`` is a list of modality files or one 4D file (both kept as given),
        ``"label"`` one file; every listed file is checked to exist. A ``None`` grade becomes ``""`` because
        MONAI's collate cannot batch ``None``.
    """
    num_folds, fold = check_folds(num_folds, fold)
    if not data_list_file_path:
        built = build_datalist(dataset_dir, num_folds=num_folds, fold=fold)
        if key not in built:
            raise ValueError(
                f"key '{key}' cannot be built from dataset_dir (only {', '.join(map(repr, built))}); {_HOW_TO_PREPARE}"
            )
        items = built[key]
        base = check_dataset_dir(dataset_dir)
        source = f"datalist built from '{dataset_dir}'"
    else:
        list_file = Path(data_list_file_path)
        if not list_file.is_file():
            raise FileNotFoundError(
                f"datalist file '{data_list_file_path}' does not exist: {_HOW_TO_PREPARE}, or set "
                "data_list_file_path to '' to build the datalist from dataset_dir."
            )
        with open(list_file, encoding="utf-8") as f:
            try:
                content = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"datalist file '{list_file}' is not valid JSON ({e}); {_HOW_TO_PREPARE}") from e
        listed = content.get("training") if isinstance(content, dict) else None
        listed = [item for item in listed or [] if isinstance(item, dict) and "image" in item]
        if key in ("training", "validation") and num_folds >= 2 and isinstance(content, dict):
            # cross-validation over the labelled cases the file offers for training and validation
            validation = content.get("validation") if isinstance(content.get("validation"), list) else []
            pool = listed + [item for item in validation if isinstance(item, dict) and "image" in item]
            pool = [{**item, "case": item.get("case") or case_id(item["image"])} for item in pool]
            train, val = fold_cases(pool, num_folds, fold)
            content = {**content, "training": train, "validation": val}
        elif key in ("training", "validation") and "validation" not in content and len(listed) >= 2:
            # a Decathlon dataset.json lists only "training": hold out the validation split from it
            train, val = split_cases([{**item, "case": item.get("case") or case_id(item["image"])} for item in listed])
            content = {**content, "training": train, "validation": val}
        if not isinstance(content, dict) or key not in content:
            found = ", ".join(sorted(content)) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"datalist file '{list_file}' has no '{key}' section (found: {found}); {_HOW_TO_PREPARE}")
        items = content[key]
        if not isinstance(items, list):
            raise ValueError(f"section '{key}' of datalist file '{list_file}' must be a list of items.")
        base = Path(dataset_dir) if dataset_dir else list_file.parent
        source = f"datalist file '{list_file}'"

    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):  # a bare path, as in a Decathlon "test" section
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"{source}, '{key}' item {i}: expected a dict with an 'image' entry, got {item!r}.")
        where = f"{source}, '{key}' item {i} (case '{item.get('case', '?')}')"
        resolved = dict(item)
        image = item["image"]
        if isinstance(image, (list, tuple)):
            resolved["image"] = [_resolve(p, base, where) for p in image]
        else:
            resolved["image"] = _resolve(image, base, where)
        if item.get("label") is not None:
            resolved["label"] = _resolve(item["label"], base, where)
        else:
            resolved.pop("label", None)
        if "grade" in resolved and resolved["grade"] is None:
            resolved["grade"] = ""
        out.append(resolved)
    if not out:
        hint = (
            "the 9:1 split holds out a validation case only from a grade with two or more cases: add cases, or give "
            "a datalist with a 'validation' section (--data_list_file_path)"
            if not data_list_file_path
            else f"add items to '{key}', or pick another section"
        )
        raise ValueError(f"{source}: section '{key}' is empty, so there is nothing to run on; {hint}.")
    return out


def _with_case_ids(items: list[dict], source: str) -> list[dict]:
    """Give every item a ``"case"`` (see :func:`bundle.cases.case_id`) and check that no two items share one."""
    seen: dict[str, int] = {}
    out = []
    for i, item in enumerate(items):
        item = dict(item)
        if not item.get("case"):
            item["case"] = case_id(item["image"])
        item["case"] = str(item["case"])
        parts = item["case"].replace("\\", "/").split("/")
        if os.path.isabs(item["case"]) or ".." in parts or not all(parts):
            raise ValueError(
                f"{source}: item {i} has case id '{item['case']}', which would write its output outside output_dir; "
                "give it a relative 'case' entry without '..' (e.g. the subject's name)."
            )
        if item["case"] in seen:
            raise ValueError(
                f"{source}: items {seen[item['case']]} and {i} are both case '{item['case']}', so their outputs "
                "would overwrite each other; give each item a unique 'case' entry."
            )
        seen[item["case"]] = i
        item.pop("grade", None)  # not needed past the split, and MONAI's collate cannot batch None
        out.append(item)
    return out


def _single_files(folder: Path) -> list[Path]:
    """The 4D NIfTI files directly in ``folder`` (hidden files and BraTS per-modality files skipped)."""
    files = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or NIFTI_PATTERN.match(name):
            continue
        if name.lower().endswith(_SINGLE_FILE_SUFFIXES):
            files.append(path)
    return files


def inference_datalist(dataset_dir, data_list_file_path="", key: str = "testing") -> list[dict]:
    """Cases to segment, as datalist items ``{"image": ..., "case": "<case id>"}`` with absolute paths.

    This is what ``configs/inference.json`` calls for ``dataset#data``. The cases come from, in this order:

    * ``data_list_file_path``, when given: section ``key`` of a Decathlon-style datalist (see
      :func:`load_datalist`; relative paths resolved against ``dataset_dir``, or the file's folder);
    * ``dataset_dir`` as a single image file: one case, a 4D multi-modality file (channels last, e.g. MSD
      Task01's ``BRATS_001.nii.gz`` or what MONAI Label sends) or a 2D image;
    * ``dataset_dir`` as a folder of BraTS cases in a layout :func:`bundle.cases.find_cases` knows (labels
      not needed);
    * ``dataset_dir`` as a folder in a 2D layout (:func:`bundle.cases.find_image_pairs`): its section ``key``
      (ISIC 2017's ``testing`` by default), masks not needed;
    * ``dataset_dir`` as a folder of 4D ``.nii``/``.nii.gz`` files, or else of 2D images, one case per file.

    Each item's ``"case"`` (from the datalist, :func:`bundle.cases.find_cases`, or :func:`bundle.cases.case_id`)
    names its output file, so case ids must be unique.
    """
    if data_list_file_path:
        items = load_datalist(data_list_file_path, dataset_dir, key)
        return _with_case_ids(items, f"datalist file '{data_list_file_path}', section '{key}'")
    if not dataset_dir:
        raise ValueError(
            "nothing to segment: set --dataset_dir to a case (a 4D .nii.gz file), a folder of BraTS cases or of "
            "4D files, or --data_list_file_path to a datalist JSON file (with a 'testing' section, or set "
            "--data_list_key)."
        )
    root = Path(dataset_dir)
    if not root.exists():
        raise FileNotFoundError(
            f"'{dataset_dir}' does not exist: point --dataset_dir at a 4D multi-modality image, a folder of BraTS "
            "cases or of 4D images, or give a datalist with --data_list_file_path."
        )
    if root.is_file():
        if not root.name.lower().endswith(IMAGE_SUFFIXES + IMAGE_2D_SUFFIXES):
            raise ValueError(
                f"'{dataset_dir}' is not an image file ({', '.join(IMAGE_SUFFIXES)}): point --dataset_dir at a "
                "4D multi-modality image, a folder of cases, or give a datalist with --data_list_file_path."
            )
        path = os.path.abspath(root)
        return [{"image": path, "case": case_id(path)}]
    root = check_dataset_dir(dataset_dir)
    cases, pairs = _layouts(root, require_label=False)
    if pairs is not None:
        if key not in pairs:
            raise ValueError(
                f"'{dataset_dir}' holds 2D sections {', '.join(map(repr, pairs))} but not '{key}': set --data_list_key, "
                "or point --dataset_dir at a folder of images."
            )
        items = [{"image": str(root.resolve() / item["image"]), "case": item["case"]} for item in pairs[key]]
        return _with_case_ids(items, f"'{key}' images under '{dataset_dir}'")
    if cases:
        items = [{"image": [str(root.resolve() / p) for p in item["image"]], "case": item["case"]} for item in cases]
        return _with_case_ids(items, f"cases found under '{dataset_dir}'")
    files = _single_files(root) or images_in(root)
    if not files:
        raise FileNotFoundError(
            f"no case found in '{dataset_dir}'. Searched: {LAYOUTS_SEARCHED} (recursively), {LAYOUTS_2D}, 4D "
            "multi-modality *.nii.gz / *.nii files and 2D images (directly in the folder). Point --dataset_dir "
            "at one of those, or give a "
            "datalist with --data_list_file_path."
        )
    items = [{"image": str(f.resolve()), "case": case_id(f)} for f in files]
    return _with_case_ids(items, f"image files in '{dataset_dir}'")


def _relative(path: str, base: str) -> str:
    """``path`` relative to ``base`` (posix separators) when it lies under it, else unchanged."""
    if base and os.path.isabs(path) and Path(path).resolve().is_relative_to(Path(base).resolve()):
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    return path


def record_split(ckpt_dir, training: Sequence[dict], validation: Sequence[dict], dataset_dir="") -> str:
    """Write the cases a training uses, ``<ckpt_dir>/datalist.json``, beside the ``model.pt`` it trains.

    The file is a datalist (sections ``training`` and ``validation``, paths relative to ``dataset_dir`` where they
    lie under it), so evaluation can score exactly the cases the model did not see, however ``dataset_dir`` has
    changed since (:func:`evaluation_datalist`), and it can be given back as ``--data_list_file_path``. Called
    from the training config's ``start_checks``; returns the file's path.
    """
    from .files import write_atomic

    def entry(item: dict) -> dict:
        out = {k: v for k, v in item.items() if k in ("image", "label", "case", "grade")}
        image = out.get("image")
        if isinstance(image, list):
            out["image"] = [_relative(p, dataset_dir) for p in image]
        else:
            out["image"] = _relative(image, dataset_dir)
        if out.get("label"):
            out["label"] = _relative(out["label"], dataset_dir)
        out["case"] = str(item.get("case") or case_id(item["image"]))
        return out

    record = {
        "description": "the cases this model was trained and validated on (written by training; bundle.datalist)",
        "dataset_dir": str(os.path.abspath(dataset_dir)) if dataset_dir else "",
        "training": [entry(item) for item in training],
        "validation": [entry(item) for item in validation],
    }
    path = os.path.join(str(ckpt_dir), SPLIT_RECORD)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    return path


def _listed(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def _split_record(ckpt_path) -> tuple[str, dict | None]:
    path = os.path.join(os.path.dirname(str(ckpt_path)), SPLIT_RECORD) if ckpt_path else ""
    if not path or not os.path.isfile(path):
        return path, None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"the training's split record '{path}' does not load ({error}): restore it, or delete it and give the "
            "cases to evaluate with --data_list_file_path."
        ) from error
    if not isinstance(record, dict) or not isinstance(record.get("training"), list):
        raise ValueError(f"the training's split record '{path}' has no 'training' list: restore it, or delete it.")
    return path, record


def evaluation_datalist(data_list_file_path, dataset_dir, key: str = "validation", ckpt_path="") -> list[dict]:
    """Labelled cases to evaluate: :func:`load_datalist` items, each checked to have a label and given a case id,
    none of them a case the model was trained on.

    The cases a model was trained on are read from the split record its training wrote beside it
    (:func:`record_split`, ``datalist.json`` beside ``ckpt_path``). With no ``data_list_file_path`` and
    ``key="validation"`` the record's validation cases are evaluated. Any case of the record's ``training``
    section is refused, naming it.

    Without a record (weights trained elsewhere), the validation cases are the same 9:1 per-grade split of
    ``dataset_dir`` as ``configs/train.json`` draws, which is the training's only if ``dataset_dir`` holds the
    same labelled cases: when the folder holds cases without a label (dropped, so the split would be re-drawn
    over fewer cases), evaluation is refused, naming them.
    """
    record_path, record = _split_record(ckpt_path)
    if record is not None and not data_list_file_path and key == "validation":
        base = dataset_dir or record.get("dataset_dir") or os.path.dirname(record_path)
        items = load_datalist(record_path, base, key)
        source = f"split record '{record_path}' (the validation cases of the training)"
    else:
        items = load_datalist(data_list_file_path, dataset_dir, key)
        source = (
            f"datalist file '{data_list_file_path}'" if data_list_file_path else f"datalist built from '{dataset_dir}'"
        )
    if record is None and not data_list_file_path:
        try:
            unlabelled = [item["case"] for item in find_cases(dataset_dir, require_label=False) if "label" not in item]
        except (FileNotFoundError, ValueError):
            unlabelled = []
        if unlabelled:
            raise ValueError(
                f"cannot tell which cases under '{dataset_dir}' the model did not see: no split record beside "
                f"'{ckpt_path}' ({SPLIT_RECORD}, written by training), and {len(unlabelled)} case(s) there have no "
                f"label ({_listed(unlabelled)}), so the 9:1 split re-drawn over the others is not the training's "
                " and would score training cases. Restore their labels, or give "
                "the held-out cases with --data_list_file_path."
            )
    if not items:
        raise ValueError(f"{source}: section '{key}' holds no case to evaluate.")
    items = _with_case_ids(items, f"{source}, section '{key}'")
    unlabelled = [item["case"] for item in items if not item.get("label")]
    if unlabelled:
        raise ValueError(
            f"{source}, section '{key}': evaluation needs a ground-truth label for every case, but "
            f"{', '.join(unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''} have none. Add 'label' entries, "
            "or segment unlabelled cases with configs/inference.json instead."
        )
    if record is not None:
        trained = {str(i.get("case") or case_id(i["image"])) for i in record["training"] if isinstance(i, dict)}
        seen = [item["case"] for item in items if item["case"] in trained]
        if seen:
            raise ValueError(
                f"{source}, section '{key}': {len(seen)} case(s) to evaluate were used to train this model "
                f"({_listed(seen)}; split record '{record_path}'): their scores "
                "would overstate the model. Evaluate the held-out cases (drop --data_list_file_path to use the "
                "record's validation cases), or remove these from the datalist."
            )
    return items
