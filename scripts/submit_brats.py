"""Write a BraTS challenge submission: one ``<case id>.nii.gz`` label map per case, on the case's grid, and a zip.

    python scripts/submit_brats.py --input_dir /data/BraTS2024-GLI-Validation --output_dir submission \\
        --label_convention brats2024

The cases of ``--input_dir`` (any layout the bundle reads: BraTS 2018-2021 ``<case>/<case>_{t1,t1ce,t2,flair}``,
BraTS 2023+ ``<case>/<case>-{t1n,t1c,t2w,t2f}``, NIfTI) are segmented by the bundle's own inference
(``configs/inference.json`` through ``monai.bundle``, with the weights of ``--bundle_root``'s ``models/model.pt`` or
``--ckpt_path``), each written as ``<output_dir>/<case id>.nii.gz``: the challenge's naming (BraTS 2023+
``BraTS-GLI-00000-000.nii.gz``, BraTS 2021 ``BraTS2021_00000.nii.gz``), in the label values of the chosen year:

* ``brats`` (2013-2021): 1 NCR/NET, 2 ED, 4 ET;
* ``brats2023``: 1 NETC, 2 SNFH, 3 ET;
* ``brats2024`` (post-treatment glioma, de Verdier et al. 2024): 1 NETC, 2 SNFH, 3 ET, 4 RC.

The weights must have been trained for that label set (their recipe's ``label_convention``). Before any case runs,
every case's modalities must share one grid (shape, origin, spacing, direction); after inference, every written
label map must be on its case's grid and hold only the year's label values, as the challenge's upload check
requires. A case that fails either check is refused by name (and its prediction removed). Then
``<output_dir>.zip`` (or ``--zip_path``) holds the label maps, at the zip's top level, as the challenge uploads them.

Other ``--key value`` arguments go to the inference as config overrides (``--ensemble "['a/model.pt','b/model.pt']"``,
``--device cpu``, ``--sw_batch_size 64``).
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.bundle.scripts import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from bundle.checkpoints import read_recipe, recipe_path  # noqa: E402
from bundle.constants import REGION_LABEL_PRESETS  # noqa: E402
from bundle.datalist import inference_datalist  # noqa: E402

#: The label values a submission may hold, per year (label_convention).
CHALLENGE_LABELS = {"brats": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3), "brats2024": (0, 1, 2, 3, 4)}
#: Case ids as the challenge names them: BraTS 2023+ ``BraTS-GLI-00000-000``; 2021 ``BraTS2021_00000`` (2020
#: ``BraTS20_Validation_001``, 2018/2019 ``Brats18_CBICA_AAA_1``).
CASE_ID_PATTERNS = {
    "brats": re.compile(r"^(BraTS20\d\d_\d{5}|BraTS20_(Training|Validation|Testing)_\d{3}|Brats1\d_.+)$", re.I),
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$"),
    "brats2024": re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$"),
}
#: Grids agree when origins and axes agree to this many mm (NIfTI stores them as float32).
TOLERANCE_MM = 1e-3


def grid(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine of a NIfTI file (from its header only)."""
    name = str(path)
    if not name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(
            f"'{name}' is not NIfTI: BraTS submissions (2018 on) are NIfTI on the NIfTI inputs' grid; convert the "
            "case to .nii.gz first."
        )
    image = nib.load(name)
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def grid_difference(shape, affine, ref_shape, ref_affine) -> str:
    """What differs between two grids, in words (shape, origin, spacing, direction); ``""`` if they agree."""
    if tuple(shape) != tuple(ref_shape):
        return f"shape {list(shape)} instead of {list(ref_shape)}"
    spacing, ref_spacing = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ref_affine[:3, :3], axis=0)
    if not np.allclose(affine[:3, 3], ref_affine[:3, 3], atol=TOLERANCE_MM):
        return f"origin {affine[:3, 3].round(4).tolist()} instead of {ref_affine[:3, 3].round(4).tolist()}"
    if not np.allclose(spacing, ref_spacing, atol=TOLERANCE_MM):
        return f"spacing {spacing.round(4).tolist()} instead of {ref_spacing.round(4).tolist()}"
    if not np.allclose(affine[:3, :3], ref_affine[:3, :3], atol=TOLERANCE_MM):
        return f"direction {affine[:3, :3].round(4).tolist()} instead of {ref_affine[:3, :3].round(4).tolist()}"
    return ""


def case_grid(item: dict) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid of a case: that of its modality files, which must all share it (else an error naming the case)."""
    files = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    shape, affine = grid(files[0])
    for other in files[1:]:
        difference = grid_difference(*grid(other), shape, affine)
        if difference:
            raise ValueError(
                f"case '{item['case']}': '{other}' has {difference} of '{files[0]}'. The modalities of a BraTS case "
                "are co-registered on one grid; fix or remove this case, the challenge expects its prediction on "
                "that grid."
            )
    return shape, affine


def check_prediction(path: Path, case: str, shape, affine, allowed) -> list[int]:
    """The label values of the prediction at ``path``, after checking it is on the case's grid with ``allowed`` values."""
    if not path.is_file():
        raise FileNotFoundError(f"case '{case}': the inference wrote no '{path}'; see the inference's log above.")
    image = nib.load(str(path))
    difference = grid_difference(tuple(image.shape), np.asarray(image.affine, dtype=np.float64), shape, affine)
    if difference:
        raise ValueError(f"case '{case}': the prediction '{path}' has {difference} of the input")
    values = sorted(int(v) for v in np.unique(np.asarray(image.dataobj)))
    unexpected = [v for v in values if v not in allowed]
    if unexpected:
        raise ValueError(f"case '{case}': the prediction '{path}' holds label values {unexpected}, not in {allowed}")
    return values


def check_weights(ckpt_path: str, label_convention: str) -> None:
    """Refuse weights whose recipe writes label values other than those of ``label_convention``'s year."""
    recipe = read_recipe(ckpt_path)
    if not recipe:
        raise FileNotFoundError(
            f"no recipe beside '{ckpt_path}' ({recipe_path(ckpt_path)}): the submission needs to know which labels "
            "the weights write. Train with configs/train.json (it writes the recipe), or pass --ckpt_path."
        )
    trained = recipe.get("label_convention", "brats")
    if trained != label_convention:
        raise ValueError(
            f"the weights '{ckpt_path}' were trained for label_convention '{trained}', not '{label_convention}': "
            f"pass --label_convention {trained}, or weights trained with --label_convention {label_convention}."
        )
    written = [int(v) for v in recipe.get("region_labels", REGION_LABEL_PRESETS[trained])]
    if not set(written) <= set(CHALLENGE_LABELS[label_convention]):
        raise ValueError(
            f"the weights '{ckpt_path}' write label values {written} (recipe region_labels), but a {label_convention} "
            f"submission holds only {list(CHALLENGE_LABELS[label_convention])}: train with the convention's regions."
        )


def write_zip(files: list[Path], zip_path: Path) -> Path:
    """``files`` at the top level of ``zip_path``, in name order, written under a temporary name then renamed."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(files, key=lambda p: p.name):
            archive.write(file, arcname=file.name)
    os.replace(tmp, zip_path)
    return zip_path


def main(
    input_dir: str,
    output_dir: str,
    label_convention: str,
    bundle_root: str = "",
    ckpt_path: str = "",
    zip_path: str = "",
    **overrides,
) -> str:
    """Segment every case of ``input_dir`` into ``output_dir/<case id>.nii.gz`` and zip them; returns the zip's path.

    Args:
        input_dir: folder of cases (or a datalist's ``dataset_dir``; any layout ``configs/inference.json`` reads).
        output_dir: folder for the label maps (created; the inputs must not be in it).
        label_convention: the year's label set: ``brats`` (2013-2021), ``brats2023`` or ``brats2024``.
        bundle_root: the bundle whose ``configs/inference.json`` and ``models/model.pt`` segment the cases (this
            script's own by default).
        ckpt_path: other weights than ``<bundle_root>/models/model.pt``.
        zip_path: where the zip goes; ``<output_dir>.zip`` by default.
        overrides: other inference config overrides (``--device cpu``, ``--ensemble "[...]"``).
    """
    if label_convention not in CHALLENGE_LABELS:
        raise ValueError(
            f"--label_convention {label_convention!r}: choose the year's label set, one of "
            f"{', '.join(CHALLENGE_LABELS)} (brats: 2013-2021; brats2023; brats2024: post-treatment, with RC)."
        )
    bundle_root = str(Path(bundle_root or ROOT).resolve())
    config = Path(bundle_root) / "configs" / "inference.json"
    if not config.is_file():
        raise FileNotFoundError(f"no '{config}': point --bundle_root at the bundle folder (it holds configs/).")
    weights = ckpt_path or os.path.join(bundle_root, "models", "model.pt")
    if "ensemble" not in overrides:
        check_weights(weights, label_convention)
    output = Path(output_dir).resolve()
    allowed = list(CHALLENGE_LABELS[label_convention])

    items = inference_datalist(input_dir)
    print(f"{len(items)} case(s) in '{input_dir}'; checking that each case's modalities share one grid")
    grids = {item["case"]: case_grid(item) for item in items}
    for case in grids:
        if not CASE_ID_PATTERNS[label_convention].match(case):
            print(
                f"warning: case id '{case}' is not named as {label_convention} cases are; its file is '{case}.nii.gz'"
            )

    print(f"segmenting with {config} ({weights if 'ensemble' not in overrides else 'the ensemble'})")
    settings = {"ckpt_path": ckpt_path} if ckpt_path else {}
    run(
        config_file=str(config),
        bundle_root=bundle_root,
        dataset_dir=str(input_dir),
        output_dir=str(output),
        output_postfix="",  # <case id>.nii.gz, the challenge's naming
        output_format="label",
        continue_on_error=False,  # a submission needs every case
        **{**settings, **overrides},
    )

    print(f"checking {len(grids)} prediction(s) against their cases' grids and the {label_convention} labels")
    files, refused = [], []
    for case, (shape, affine) in grids.items():
        path = output / f"{case}.nii.gz"
        try:
            values = check_prediction(path, case, shape, affine, allowed)
        except (ValueError, FileNotFoundError) as error:
            refused.append(str(error))
            path.unlink(missing_ok=True)
            continue
        files.append(path)
        print(f"  {case}.nii.gz: {'x'.join(map(str, shape))}, labels {values}")
    if refused:
        raise ValueError(
            f"{len(refused)} of {len(grids)} case(s) would fail the challenge's check (their predictions were "
            "removed; no zip written):\n  " + "\n  ".join(refused)
        )
    archive = write_zip(files, Path(zip_path) if zip_path else output.with_name(output.name + ".zip"))
    print(f"wrote {archive} ({len(files)} label maps, {archive.stat().st_size / 1e6:.2f} MB)")
    return str(archive)


if __name__ == "__main__":
    fire.Fire(main)
