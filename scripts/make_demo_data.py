"""Generate the synthetic BraTS-like demo dataset (``bundle.demo``) for a CPU run of the bundle.

    python scripts/make_demo_data.py --output_dir data/demo --num_cases 16 --shape "[96,96,64]" --seed 0

``--difficulty`` (0 = the default demo, 1 = hard: more noise and bias, fainter and smaller tumours, noisy label
borders; ``bundle.phantom.DIFFICULTY_RANGE``) makes a dataset on which methods no longer all saturate.
``--label_convention brats2023`` or ``brats2024`` writes the BraTS 2023+ layout and label values instead, brats2024
with a resection cavity (label 4) in every case (``bundle.demo``).

An existing demo dataset made with the same parameters is kept; pass ``--overwrite`` to regenerate it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from bundle.demo import DEMO_MANIFEST, ensure_demo_data, make_demo_dataset  # noqa: E402


def main(
    output_dir: str = "data/demo",
    num_cases: int = 16,
    shape=(96, 96, 64),
    seed: int = 0,
    overwrite: bool = False,
    difficulty: float = 0.0,
    label_convention: str = "brats",
) -> None:
    """Write ``num_cases`` cases of size ``shape`` to ``output_dir`` and print a summary of what was made."""
    start = time.perf_counter()
    manifest_file = Path(output_dir) / DEMO_MANIFEST
    before = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
    make = make_demo_dataset if overwrite else ensure_demo_data
    make(
        output_dir,
        num_cases=num_cases,
        shape=shape,
        seed=seed,
        progress=True,
        difficulty=difficulty,
        label_convention=label_convention,
    )
    seconds = time.perf_counter() - start

    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    cases = manifest["cases"]
    kept = before is not None and manifest_file.stat().st_mtime_ns == before
    print(f"{'kept existing' if kept else 'generated'} demo dataset in {output_dir} ({seconds:.1f} s)")
    print(
        f"cases: {len(cases)} of shape {manifest['shape']}, seed {manifest['seed']}, difficulty "
        f"{manifest.get('difficulty', 0.0)}, layout {manifest['layout']}"
    )
    fractions = [c["tumour_fraction_of_head"] for c in cases]
    slices = [c["axial_slices_with_tumour"] / manifest["shape"][2] for c in cases]
    mean = sum(fractions) / len(cases)
    print(f"tumour voxels per head: {min(fractions):.1%} to {max(fractions):.1%} (mean {mean:.1%})")
    print(f"axial slices with tumour: mean {sum(slices) / len(cases):.0%}")
    datalist = Path(output_dir).with_name(Path(output_dir).name + "_datalist.json")
    print(f"next: python scripts/prepare_datalist.py --dataset_dir {output_dir} --output {datalist}")


if __name__ == "__main__":
    fire.Fire(main)
