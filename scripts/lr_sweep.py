"""A small learning-rate sweep per ablation row, chosen on the validation split (issue 21, item 5).

Each learning rate runs the ablation (``scripts/ablation.py``) for the given rows and seeds in a work folder of
its own (``<work_dir>/lr<value>``; the data are shared), so the rows' default runs are not retrained. For each
row the learning rate with the highest mean best-validation Dice over the seeds is chosen (the validation
split only, as model selection does); the report gives, per row and learning rate, the mean best validation
Dice and the mean test Dice, and marks the choice. The test Dice of the chosen rate is what a fair comparison
of rows reads.

    OMP_NUM_THREADS=1 python scripts/lr_sweep.py --rows "['S3-3C','U-net']" --rates "[5e-4,2e-3,8e-3]" \\
        --seeds 2 --work_dir /tmp/lr_sweep --out docs/ablation/lr_sweep.md --head_guard false

``--default_work_dir`` points at an ablation work folder whose runs at the suite's own learning rate are reused
(the rate of ``--default_rate``).
"""

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import ablation  # noqa: E402


def _best_validation(run_dir: Path) -> Optional[float]:
    path = run_dir / "eval" / "validation_metrics.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text())
    best = history.get("best") or {}
    return best.get(history.get("key_metric", "val_mean_dice"))


def _test_dice(run_dir: Path) -> Optional[float]:
    path = run_dir / ablation.RESULT
    if not path.is_file():
        return None
    dice = json.loads(path.read_text())["metrics"]["dice"]
    values = [v for v in dice.values() if v is not None]
    return sum(values) / len(values) if values else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def lr_sweep(
    rows: Sequence[str] = ("S3-3C", "S3-3C + Dice", "U-net", "U-net + Dice"),
    rates: Sequence[float] = (5e-4, 2e-3, 8e-3),
    seeds: int = 2,
    suite: str = "demo",
    work_dir: str = "lr_sweep_runs",
    default_work_dir: Optional[str] = None,
    default_rate: float = 2e-3,
    out: str = "docs/ablation/lr_sweep.md",
    **overrides: Any,
) -> dict:
    """Run every row at every rate (``seeds`` seeds), choose each row's rate on validation, write ``out``."""
    rows = [rows] if isinstance(rows, str) else list(rows)
    work = Path(work_dir).resolve()
    table: dict = {}
    for rate in rates:
        reuse = default_work_dir is not None and float(rate) == float(default_rate)
        rate_dir = Path(default_work_dir).resolve() if reuse else work / f"lr{rate:g}"
        data = rate_dir / suite / "data"
        if not reuse and default_work_dir and not data.exists():  # the default runs' cases, not made again
            data.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(default_work_dir).resolve() / suite / "data", data)
        run_overrides = dict(overrides) if reuse else {**overrides, "learning_rate": float(rate)}
        ablation.ablation(
            rows=rows, seeds=seeds, suite=suite, out=str(rate_dir / "report"), work_dir=str(rate_dir), **run_overrides
        )
        for row in rows:
            dirs = [rate_dir / suite / ablation._slug(row) / f"seed{s}" for s in range(int(seeds))]
            table.setdefault(row, {})[float(rate)] = {
                "validation": _mean([_best_validation(d) for d in dirs]),
                "test": _mean([_test_dice(d) for d in dirs]),
            }
    lines = [
        f"## Learning-rate sweep, suite `{suite}`, {seeds} seed(s) per rate",
        "",
        'Command: `python scripts/lr_sweep.py --rows "'
        + str(rows)
        + f'" --rates "{list(rates)}" --seeds {seeds}`'
        + "".join(f" --{k} {v}" for k, v in overrides.items())
        + ". The rate (Adam, critics at the same rate) is "
        "chosen per row by the mean best validation Dice (2 validation cases, the model-selection split); the test "
        "Dice (8 held-out cases) is shown beside it, not used for the choice.",
        "",
        "| row | " + " | ".join(f"lr {r:g}: validation / test" for r in rates) + " | chosen |",
        "| --- | " + " | ".join("---" for _ in rates) + " | --- |",
    ]
    for row, by_rate in table.items():
        scored = {r: v for r, v in by_rate.items() if v["validation"] is not None}
        chosen = max(scored, key=lambda r: scored[r]["validation"]) if scored else None
        cells = []
        for r in rates:
            v = by_rate.get(float(r), {})
            cell = " / ".join("n/a" if v.get(k) is None else f"{v[k]:.3f}" for k in ("validation", "test"))
            cells.append(f"**{cell}**" if chosen == float(r) else cell)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'n/a' if chosen is None else f'{chosen:g}'} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    fire.Fire(lr_sweep)
