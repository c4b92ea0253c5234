"""Ensembles and post-processing against the single model, on the hard demo's held-out test cases.

    OMP_NUM_THREADS=1 python scripts/ensemble_study.py --seeds 3 --num_folds 5

Everything is S3-3C on the ablation's ``demo`` suite (``scripts/ablation.py``: 24 synthetic cases of 64x64x40 at
``demo_difficulty`` 0.5, the last 8 held out for testing), and every comparison is on those 8 test cases:

* **Views**: S3-3C trained along each stored axis (``slice_axis`` 2 axial, 0 sagittal, 1 coronal), ``seeds`` seeds
  each (the ablation's rows ``S3-3C``, ``S3-3C sagittal``, ``S3-3C coronal``, reused when done), and the
  **multi-view ensemble** of the three models of each seed (``--ensemble``, every member along its own axis).
* **Folds**: a ``num_folds``-fold cross-validation over the 16 training and validation cases
  (``scripts/cross_validate.py``), each fold model scored on the test cases, and the **fold ensemble** of all of
  them (nnU-Net's inference, Isensee et al. 2021).
* **Post-processing**, chosen on the cross-validation's out-of-fold predictions (``--choose_postprocessing``,
  nnU-Net's rule), then applied to each seed's axial model on the test cases: the chosen overlay, and each step
  alone at its best out-of-fold value (threshold per region, minimum component size per region, the enhancing-tumour
  volume rule), so that a step the rule dropped is measured too.

Paired differences (mean test Dice over the regions, first minus second) are over seeds run on the same data, with
their 95 % t-interval; for the fold ensemble the pairs are the ensemble against each fold model. The report goes to
``out`` (``README.md``, ``results.csv``); runs live in ``work_dir`` and a finished one is reused.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import ablation  # noqa: E402
import cross_validate  # noqa: E402

from bundle.files import write_atomic  # noqa: E402

#: The single models along each axis: ablation rows.
VIEWS = {"axial": "S3-3C", "sagittal": "S3-3C sagittal", "coronal": "S3-3C coronal"}
VARIANT = "configs/variants/s3_3c.json"


def _dice(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "eval" / "metrics_summary.json").read_text(encoding="utf-8"))
    return {region: values["mean"] for region, values in summary["metrics"]["dice"].items()}


def evaluate(run_dir: Path, data: dict, overlays: tuple[str, ...] = (), **settings: Any) -> dict[str, float]:
    """Score on the test cases with the suite's evaluation configs (plus ``overlays``), or reuse a finished run."""
    from monai.bundle.scripts import run

    record = {"overlays": list(overlays), "settings": settings}
    done = run_dir / "result.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("record") == record:
        return _dice(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = [*ablation.SUITES["demo"].eval_configs, VARIANT, *overlays, "configs/evaluate.json"]
    with ablation.logs_to(run_dir / "evaluate.log"):
        run(
            "run",
            config_file=[str(c if Path(c).is_absolute() else ROOT / c) for c in configs],
            bundle_root=str(run_dir),
            data_list_key="testing",
            progress=False,
            **data,
            **settings,
        )
    write_atomic(str(done), json.dumps({"record": record, "dice": _dice(run_dir)}, indent=2).encode())
    return _dice(run_dir)


def _result(row: str, seed: int, dice: dict[str, float]) -> dict:
    return {"row": row, "seed": seed, "metrics": {"dice": dice}}


def _best_alone(candidates: list[dict], step: str) -> Optional[dict]:
    """The overlay of ``step`` alone at its best out-of-fold value per region (None: nothing but off was best)."""
    rows = [c for c in candidates if c["step"] == step]
    if not rows:
        return None
    best: dict[str, Any] = {}
    for region in dict.fromkeys(c["region"] for c in rows):
        options = [c for c in rows if c["region"] == region]
        best[region] = max(options, key=lambda c: statistics.fmean(c["dice"]))["value"]
    off = 0.5 if step == "threshold" else 0
    if all(value == off for value in best.values()):
        return None
    return {step: next(iter(best.values())) if step == "et_min_volume" else best}


def study(
    seeds: int = 3,
    num_folds: int = 5,
    work_dir: str = "ensemble_runs",
    out: str = "docs/ablation/ensembles",
    **overrides: Any,
) -> None:
    """Run (or reuse) every model and evaluation, then write the report to ``out``."""
    started = time.perf_counter()
    work, report = Path(work_dir).resolve(), Path(out)
    suite = ablation.SUITES["demo"]
    seeds = list(range(int(seeds)))

    print("== single models along each axis", flush=True)
    ablation.ablation(
        rows=list(VIEWS.values()),
        seeds=len(seeds),
        suite="demo",
        out=str(report / "views"),
        work_dir=str(work),
        **overrides,
    )
    data = suite.prepare(work / "demo", suite.configs, overrides)
    model = {(view, s): work / "demo" / ablation._slug(row) / f"seed{s}" for view, row in VIEWS.items() for s in seeds}
    results = [_result(view, s, _dice(model[view, s])) for view in VIEWS for s in seeds]

    print("== multi-view ensembles", flush=True)
    for s in seeds:
        members = [str(model[view, s] / "models" / "model.pt") for view in VIEWS]
        dice = evaluate(work / "multiview" / f"seed{s}", data, ensemble=members, **overrides)
        results.append(_result("multi-view ensemble", s, dice))

    print(f"== {num_folds}-fold cross-validation", flush=True)
    cv_out = report / "cross_validation"
    cross_validate.cross_validate(
        num_folds=num_folds,
        configs=[*suite.configs, VARIANT],
        eval_configs=[*suite.eval_configs, VARIANT],
        out=str(cv_out),
        work_dir=str(work / "cv"),
        choose_postprocessing=True,
        **data,
        **overrides,
    )
    folds = [str(work / "cv" / f"fold{i}" / "models" / "model.pt") for i in range(num_folds)]
    fold_results = []
    for i, weights in enumerate(folds):
        dice = evaluate(work / "fold_models" / f"fold{i}", data, ckpt_path=weights, **overrides)
        fold_results.append(_result("fold model", i, dice))
    ensemble = evaluate(work / "fold_ensemble", data, ensemble=folds, **overrides)
    fold_results += [_result("fold ensemble", i, ensemble) for i in range(num_folds)]

    print("== post-processing", flush=True)
    candidates = json.loads((cv_out / "postprocessing_candidates.json").read_text(encoding="utf-8"))
    chosen = json.loads((cv_out / "postprocessing.json").read_text(encoding="utf-8"))
    variants = {"post-processing as chosen": chosen}
    for step in ("threshold", "min_component_size", "et_min_volume"):
        alone = _best_alone(candidates, step)
        if alone is not None:
            variants[f"{step} alone"] = alone
    for name, overlay in variants.items():
        path = work / "postprocessing" / ablation._slug(name) / "overlay.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(overlay, indent=2) + "\n", encoding="utf-8")
        for s in seeds:
            weights = str(model["axial", s] / "models" / "model.pt")
            dice = evaluate(path.parent / f"seed{s}", data, (str(path),), ckpt_path=weights, **overrides)
            results.append(_result(name, s, dice))

    write_report(report, results, fold_results, variants, num_folds, time.perf_counter() - started)


def _mean_dice(result: dict) -> float:
    return statistics.fmean(v for v in result["metrics"]["dice"].values() if v is not None)


def _row_cells(results: list[dict], row: str, regions: list[str]) -> list[str]:
    mine = [r for r in results if r["row"] == row]
    cells = []
    for values in ([r["metrics"]["dice"][g] for r in mine] for g in regions):
        cells.append(ablation._cell(ablation._mean_std(values)))
    cells.append(ablation._cell(ablation._mean_std([_mean_dice(r) for r in mine])))
    return [row, str(len(mine)), *cells]


def _pair(results: list[dict], first: str, second: str, unit: str) -> str:
    diff = ablation.paired_difference(results, first, second)
    if diff is None:
        return f"| {first} | {second} | - | - |"
    marker = "**" if diff["low"] > 0 or diff["high"] < 0 else ""
    return (
        f"| {first} | {second} | {diff['seeds']} {unit} | "
        f"{marker}{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]{marker} |"
    )


def write_report(out: Path, results, fold_results, variants, num_folds: int, seconds: float) -> None:
    regions = list(results[0]["metrics"]["dice"])
    head = "| row | runs | " + " | ".join(f"Dice {r}" for r in regions) + " | mean Dice |"
    rule = "| --- | --- |" + " --- |" * (len(regions) + 1)
    rows = list(dict.fromkeys(r["row"] for r in results))
    lines = [
        "# Ensembles and post-processing on the hard demo",
        "",
        "Written by `OMP_NUM_THREADS=1 python scripts/ensemble_study.py` (see its docstring); mean ± std over seeds "
        f"of the test Dice on the 8 held-out cases; {seconds / 60:.0f} min on 2 CPU cores.",
        "",
        "## Views, the multi-view ensemble and post-processing (per seed)",
        "",
        head,
        rule,
        *("| " + " | ".join(_row_cells(results, row, regions)) + " |" for row in rows),
        "",
        f"## {num_folds}-fold cross-validation: each fold model and their ensemble",
        "",
        head,
        rule,
        *("| " + " | ".join(_row_cells(fold_results, row, regions)) + " |" for row in ("fold model", "fold ensemble")),
        "",
        "Out-of-fold metrics and the post-processing choice: [cross_validation/](cross_validation/README.md).",
        "",
        "## Paired differences (mean Dice, first minus second; 95 % t-interval; bold where it excludes 0)",
        "",
        "| first | second | pairs | difference |",
        "| --- | --- | --- | --- |",
        _pair(results, "multi-view ensemble", "axial", "seeds"),
        _pair(results, "sagittal", "axial", "seeds"),
        _pair(results, "coronal", "axial", "seeds"),
        _pair(fold_results, "fold ensemble", "fold model", "folds"),
        *(_pair(results, name, "axial", "seeds") for name in variants),
        "",
        "Post-processing overlays measured: "
        + "; ".join(f"{name}: `{json.dumps(overlay)}`" for name, overlay in variants.items())
        + ".",
        "",
    ]
    write_atomic(str(out / "README.md"), "\n".join(lines).encode("utf-8"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "seed", *regions, "mean_dice"])
    for r in [*results, *fold_results]:
        writer.writerow([r["row"], r["seed"], *(r["metrics"]["dice"][g] for g in regions), _mean_dice(r)])
    write_atomic(str(out / "results.csv"), buffer.getvalue().encode("utf-8"))
    print((out / "README.md").read_text(encoding="utf-8"), flush=True)


if __name__ == "__main__":
    fire.Fire(study)
