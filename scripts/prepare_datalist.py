"""Write the Decathlon-style datalist of a BraTS dataset: 9:1 training/validation split per grade (Xue et al. 2018, section 3).

    python scripts/prepare_datalist.py --dataset_dir data/BRATS2015_Training --output data/brats2015_datalist.json

Paths in the file are relative to ``dataset_dir``; point ``data_list_file_path`` of ``configs/train.json`` at it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from bundle.datalist import build_datalist  # noqa: E402
from bundle.files import atomic_path  # noqa: E402


def _grade_counts(items) -> str:
    counts = Counter(item.get("grade") or "no grade" for item in items)
    return ", ".join(f"{grade} {counts[grade]}" for grade in sorted(counts))


def main(dataset_dir: str, output: str, val_fraction: float = 0.1, seed: int = 0) -> None:
    """Find the labelled cases under ``dataset_dir``, split them and write the JSON datalist to ``output``."""
    datalist = build_datalist(dataset_dir, val_fraction=val_fraction, seed=seed)
    out = Path(output)
    with atomic_path(out) as tmp, open(tmp, "x", encoding="utf-8") as f:  # a reader never sees half a file
        json.dump(datalist, f, indent=2)
        f.write("\n")

    train, val = datalist["training"], datalist["validation"]
    print(f"cases found under {dataset_dir}: {len(train) + len(val)} ({_grade_counts(train + val)})")
    print(f"training:   {len(train)} ({_grade_counts(train)})")
    print(f"validation: {len(val)} ({_grade_counts(val)})  [val_fraction {val_fraction}, seed {seed}]")
    print(f"datalist written to {out}")


if __name__ == "__main__":
    fire.Fire(main)
