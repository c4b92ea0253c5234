"""The synthetic demo dataset on disk, so the bundle can be trained, evaluated and tested on a CPU without BraTS.

:func:`make_demo_dataset` writes the cases of :func:`bundle.phantom.make_demo_case` in the BraTS 2018-2021
NIfTI layout ``<out>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, so that :func:`bundle.cases.find_cases`
reads them like the real thing, with a manifest written last that marks the dataset complete;
:func:`ensure_demo_data` (what ``configs/demo.json`` calls) writes it only when it is not there yet.
``difficulty`` (0 = the default demo, 1 = hard; ``bundle.phantom.DIFFICULTY_RANGE``) makes a dataset on
which methods no longer all saturate (``scripts/ablation.py``).

``label_convention`` picks the BraTS release the dataset imitates: ``"brats"`` (the default, 2018-2021 names and
values 1, 2, 4), ``"brats2023"`` (the BraTS 2023+ layout ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, cases
``BraTS-DEMO-<5 digits>-000``, values 1 NETC, 2 SNFH, 3 ET) or ``"brats2024"`` (the same, plus a resection cavity
labelled 4 RC in every case: the BraTS 2024 post-treatment glioma labels, de Verdier et al. 2024).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .phantom import CAVITY_LABEL, CONTRASTS, check_shape, difficulty_settings, make_demo_case

__all__ = ["DEMO_MANIFEST", "DEMO_LABELS", "make_demo_dataset", "ensure_demo_data"]

#: File written last into a generated dataset; it records the parameters and marks the dataset complete.
DEMO_MANIFEST = "demo.json"
# Bump when the generated content changes, so ensure_demo_data regenerates older datasets.
_GENERATOR_VERSION = 1
# File suffix per contrast, in the BraTS 2018-2021 naming ("t1ce" is our "t1c").
_FILE_SUFFIXES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
# ... and in the BraTS 2023+ naming
_FILE_SUFFIXES_2023 = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
#: What the demo's label values mean, per ``label_convention`` it can imitate.
DEMO_LABELS = {
    "brats": {"0": "background", "1": "necrotic core", "2": "edema", "4": "enhancing tumour"},
    "brats2023": {"0": "background", "1": "necrotic core", "2": "edema", "3": "enhancing tumour"},
    "brats2024": {
        "0": "background",
        "1": "necrotic core",
        "2": "edema",
        "3": "enhancing tumour",
        "4": "resection cavity",
    },
}
_LAYOUTS = {
    "brats": "BraTS 2018-2021 NIfTI: <case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
    "brats2023": "BraTS 2023+ NIfTI: <case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
}


def _affine(shape) -> np.ndarray:
    """1 mm voxels, axes aligned with RAS, origin shifted off the volume centre so affine round trips are testable."""
    affine = np.eye(4)
    affine[:3, 3] = [-0.5 * (shape[0] - 1) + 2.0, -0.5 * (shape[1] - 1) - 15.0, -0.5 * (shape[2] - 1) + 10.0]
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _check_convention(label_convention: str) -> str:
    if label_convention not in DEMO_LABELS:
        raise ValueError(
            f"demo label_convention {label_convention!r} is not one the demo imitates: choose one of "
            f"{', '.join(DEMO_LABELS)}."
        )
    return label_convention


def _case_name(index: int, label_convention: str = "brats") -> str:
    return f"Demo_{index:03d}" if label_convention == "brats" else f"BraTS-DEMO-{index:05d}-000"


def _file_names(case: str, label_convention: str = "brats") -> dict[str, str]:
    """File name of each contrast and of the label (``"seg"``) of ``case`` in the layout of ``label_convention``."""
    if label_convention == "brats":
        return {**{c: f"{case}_{s}.nii.gz" for c, s in _FILE_SUFFIXES.items()}, "seg": f"{case}_seg.nii.gz"}
    return {**{c: f"{case}-{s}.nii.gz" for c, s in _FILE_SUFFIXES_2023.items()}, "seg": f"{case}-seg.nii.gz"}


def _manifest_params(
    num_cases: int,
    shape,
    seed: int,
    difficulty: float = 0.0,
    background_noise: float = 0.0,
    frame=None,
    label_convention: str = "brats",
) -> dict:
    params = {
        "generator_version": _GENERATOR_VERSION,
        "num_cases": int(num_cases),
        "shape": list(shape),
        "seed": int(seed),
        "difficulty": float(difficulty),
    }
    if background_noise:
        params["background_noise"] = float(background_noise)
    if frame is not None:
        params["frame"] = list(frame)
    if label_convention != "brats":  # absent from manifests written before the setting existed
        params["label_convention"] = label_convention
    return params


def _check_frame(frame, shape) -> tuple[int, int, int] | None:
    """``frame`` (None, or three sizes at least ``shape``'s) checked, as a tuple."""
    if frame is None or (isinstance(frame, str) and frame.strip().lower() in ("", "none", "null")):
        return None
    frame = check_shape(frame)
    if any(f < s for f, s in zip(frame, shape)):
        raise ValueError(f"demo frame {list(frame)} must be at least the head's shape {list(shape)} on every axis.")
    return frame


def _in_frame(array: np.ndarray, frame) -> np.ndarray:
    """``array`` centred in a ``frame`` of zeros (the air around a head in a BraTS volume); itself if no frame."""
    if frame is None:
        return array
    out = np.zeros(frame, array.dtype)
    out[tuple(slice((f - s) // 2, (f - s) // 2 + s) for f, s in zip(frame, array.shape))] = array
    return out


def _is_complete(output_dir: Path, params: dict) -> bool:
    """Whether ``output_dir`` holds a finished demo dataset made with ``params`` (manifest + every file)."""
    manifest = output_dir / DEMO_MANIFEST
    if not manifest.is_file():
        return False
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    content.setdefault("difficulty", 0.0)  # written before the setting existed: the default demo
    if {k: content.get(k) for k in params} != params or content.get("frame") != params.get("frame"):
        return False
    if content.get("label_convention") != params.get("label_convention"):
        return False
    convention = params.get("label_convention", "brats")
    for i in range(params["num_cases"]):
        case = _case_name(i, convention)
        for name in _file_names(case, convention).values():
            if not (output_dir / case / name).is_file():
                return False
    return True


def make_demo_dataset(
    output_dir,
    num_cases: int = 16,
    shape=(96, 96, 64),
    seed: int = 0,
    progress: bool = False,
    difficulty: float = 0.0,
    background_noise: float = 0.0,
    frame=None,
    label_convention: str = "brats",
) -> str:
    """Write ``num_cases`` synthetic cases to ``output_dir`` in the BraTS 2018-2021 NIfTI layout; return ``output_dir``.

    With ``label_convention`` ``"brats2023"`` or ``"brats2024"`` the cases are in the BraTS 2023+ layout and
    label values instead, brats2024 with a resection cavity (see the module docstring).

    ``frame`` (e.g. ``[240, 240, 155]``) centres each ``shape`` head in a larger volume of zeros, as a BraTS brain
    sits in its 240x240x155 frame with air around it (default: the volume is the head's box). Cases are called
    ``Demo_000``, ``Demo_001``, ...; images are float32, labels uint8, with a 1 mm diagonal
    affine. Files are written into a hidden sibling folder that is renamed to ``output_dir`` at the end, so an
    interrupted run never leaves a half-written dataset. An existing demo dataset at ``output_dir`` (or an
    empty folder) is replaced; any other existing folder is refused.
    """
    shape = check_shape(shape)
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
    out = Path(output_dir)
    if out.exists() and not (out.is_dir() and ((out / DEMO_MANIFEST).is_file() or not any(out.iterdir()))):
        raise FileExistsError(
            f"'{output_dir}' exists and is not a demo dataset (no {DEMO_MANIFEST}): choose another --output_dir, "
            "or remove it first."
        )
    difficulty_settings(difficulty)  # checked before anything is written
    frame = _check_frame(frame, shape)
    convention = _check_convention(label_convention)
    params = _manifest_params(num_cases, shape, seed, difficulty, background_noise, frame, convention)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        affine = _affine(frame or shape)
        cases = []
        start = time.perf_counter()
        for i in tqdm(range(int(num_cases)), desc="demo cases", unit="case", disable=not progress):
            images, label = make_demo_case(
                shape, seed, i, difficulty, background_noise, resection_cavity=convention == "brats2024"
            )
            if convention == "brats2023":
                label[label == 4] = 3  # the BraTS 2023+ enhancing label
            case = _case_name(i, convention)
            names = _file_names(case, convention)
            (tmp / case).mkdir()
            for contrast in _FILE_SUFFIXES:
                _save_nifti(_in_frame(images[contrast], frame), affine, tmp / case / names[contrast])
            _save_nifti(_in_frame(label, frame), affine, tmp / case / names["seg"])
            # the head (manifest statistics) is what is non-zero without the air's noise
            head = (make_demo_case(shape, seed, i, difficulty)[0] if background_noise else images)["t1"] > 0
            tumour = (label > 0) & ~((label == CAVITY_LABEL) & (convention == "brats2024"))  # the cavity is no tumour
            cases.append(
                {
                    "case": case,
                    "label_voxels": {v: int((label == int(v)).sum()) for v in DEMO_LABELS[convention] if v != "0"},
                    "tumour_fraction_of_head": round(float(tumour.sum() / max(head.sum(), 1)), 4),
                    "axial_slices_with_tumour": int(tumour.any(axis=(0, 1)).sum()),
                    "axial_slices_with_head": int(head.any(axis=(0, 1)).sum()),
                    "intensity_max": {c: round(float(images[c].max()), 1) for c in CONTRASTS},
                }
            )
        manifest = {
            **params,
            "difficulty_settings": difficulty_settings(difficulty),
            "layout": _LAYOUTS.get(convention, _LAYOUTS["brats2023"]),
            "labels": DEMO_LABELS[convention],
            "seconds": round(time.perf_counter() - start, 2),
            "cases": cases,
        }
        (tmp / DEMO_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _move_into_place(tmp, out, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(output_dir)


def _move_into_place(tmp: Path, out: Path, params: dict) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an older demo dataset there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        os.rename(tmp, out)
    except OSError:
        # another process (e.g. another rank of a multi-GPU run) put a dataset there first; same seed, same data
        if not _is_complete(out, params):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_demo_data(
    output_dir,
    num_cases: int = 16,
    shape=(96, 96, 64),
    seed: int = 0,
    progress: bool = False,
    difficulty: float = 0.0,
    background_noise: float = 0.0,
    frame=None,
    label_convention: str = "brats",
) -> str:
    """Return ``output_dir`` after making sure it holds the demo dataset for these parameters.

    Nothing is written when ``output_dir`` already holds a complete demo dataset made with the same
    ``num_cases``, ``shape``, ``seed``, ``difficulty`` and ``label_convention`` (checked through its ``demo.json``
    manifest and the case files); otherwise it is generated with :func:`make_demo_dataset`.
    """
    shape = check_shape(shape)
    frame = _check_frame(frame, shape)
    convention = _check_convention(label_convention)
    params = _manifest_params(num_cases, shape, seed, difficulty, background_noise, frame, convention)
    if not _is_complete(Path(output_dir), params):
        make_demo_dataset(
            output_dir,
            num_cases=num_cases,
            shape=shape,
            seed=seed,
            progress=progress,
            difficulty=difficulty,
            background_noise=background_noise,
            frame=frame,
            label_convention=convention,
        )
    return str(output_dir)
