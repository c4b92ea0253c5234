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
    tuned_seeds: int = 0,
    **overrides: Any,
) -> dict:
    """Run every row at every rate (``seeds`` seeds), choose each row's rate on validation, write ``out``.

    With ``tuned_seeds`` > ``seeds``, every row then runs ``tuned_seeds`` seeds at its chosen rate (the sweep's
    seeds reused), and the report adds each row's test Dice and the paired differences between the rows (the
    first row against each other, and every later pair whose names differ by "+ Dice"), at the tuned rates.
    """
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
    chosen_rates = {}
    for row, by_rate in table.items():
        scored = {r: v for r, v in by_rate.items() if v["validation"] is not None}
        if scored:
            chosen_rates[row] = max(scored, key=lambda r: scored[r]["validation"])
    if int(tuned_seeds) > int(seeds):
        lines += _tuned_comparison(
            rows, chosen_rates, int(tuned_seeds), suite, work, default_work_dir, default_rate, overrides
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def _tuned_comparison(rows, chosen_rates, tuned_seeds, suite, work, default_work_dir, default_rate, overrides):
    """Each row at its chosen rate for ``tuned_seeds`` seeds; report lines with test Dice and paired differences."""
    results = []
    for row in rows:
        rate = chosen_rates.get(row)
        if rate is None:
            continue
        reuse = default_work_dir is not None and float(rate) == float(default_rate)
        rate_dir = Path(default_work_dir).resolve() if reuse else work / f"lr{rate:g}"
        run_overrides = dict(overrides) if reuse else {**overrides, "learning_rate": float(rate)}
        ablation.ablation(
            rows=[row],
            seeds=tuned_seeds,
            suite=suite,
            out=str(rate_dir / "report"),
            work_dir=str(rate_dir),
            **run_overrides,
        )
        for s in range(tuned_seeds):
            path = rate_dir / suite / ablation._slug(row) / f"seed{s}" / ablation.RESULT
            results.append(json.loads(path.read_text()))
    lines = [
        "",
        f"### At each row's chosen rate, {tuned_seeds} seeds (the sweep's seeds reused)",
        "",
        "| row | rate | mean test Dice (mean ± std over seeds) | whole / core / enhancing |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        means = [statistics.fmean(v for v in r["metrics"]["dice"].values() if v is not None) for r in mine]
        regions = [statistics.fmean(r["metrics"]["dice"][k] for r in mine) for k in mine[0]["metrics"]["dice"]]
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        lines.append(
            f"| {row} | {chosen_rates[row]:g} | {statistics.fmean(means):.3f} ± {spread:.3f} | "
            + " / ".join(f"{v:.3f}" for v in regions)
            + " |"
        )
    pairs = [(rows[0], other) for other in rows[1:]]
    pairs += [
        (a, b)
        for a in rows
        for b in rows
        if a != b
        and a.replace(" + Dice", "") != a
        and a.replace(" + Dice", "") != b
        and b.endswith("+ Dice")
        and a.split()[0] != b.split()[0]
        and rows.index(a) < rows.index(b)
    ]
    lines += ["", "| first − second | seeds | difference | 95 % interval |", "| --- | --- | --- | --- |"]
    for a, b in dict.fromkeys(pairs):
        d = ablation.paired_difference(results, a, b)
        if d is not None:
            lines.append(f"| {a} − {b} | {d['seeds']} | {d['mean']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] |")
    return lines


if __name__ == "__main__":
    fire.Fire(lr_sweep)
