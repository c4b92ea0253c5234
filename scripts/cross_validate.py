"""k-fold cross-validation: train every fold, score each fold's model on the cases it held out, and report the
out-of-fold metrics of every case (nnU-Net's protocol).

    python scripts/cross_validate.py --num_folds 5 --configs "['configs/train.json','configs/demo.json']"
    python scripts/cross_validate.py --num_folds 5 --dataset_dir /data/BRATS2015_Training --out cv_report

Fold ``i`` is ``python -m monai.bundle run training`` with the training configs and ``--num_folds k --fold i``
(``bundle.datalist.fold_cases``: the labelled cases dealt into k folds per grade, fixed seed; fold ``i`` is the
validation set), trained into ``<work_dir>/fold<i>`` (its ``models/datalist.json`` records the split), then
evaluated with ``configs/inference.json`` (plus the training overlays, or ``--eval_configs``) and
``configs/evaluate.json`` on ``data_list_key validation`` with no datalist file, so evaluation reads the cases from
the fold's split record: exactly its held-out fold. Both run in this process, their logs in the fold's folder.

A fold that finished (its ``result.json``, written last, records the same configs, overrides and held-out cases) is
not trained again, so an interrupted cross-validation continues where it stopped, and the report is rewritten after
every fold. Extra ``--key value`` options are config overrides of every run (recorded, so changing them retrains).

The report in ``out``: ``oof_per_case.csv`` (every case once, scored by the model that did not train on it, with
its fold and grade), ``oof_summary.csv`` (per metric and region: mean, std and count over all cases) and
``README.md`` (the command, the folds, and the tables).

``--choose_postprocessing`` then decides the BraTS post-processing as nnU-Net does (Isensee et al. 2021, Nature
Methods 18:203-211): each fold's evaluation also saves its out-of-fold probability maps (``save_probabilities``), a
small grid of candidates (a threshold per region, a minimum component size per region, the enhancing-tumour volume
rule) is scored on them with numpy, without running a network again, and a step is kept only if it improves the
out-of-fold mean Dice. The choice is written as a config overlay, ``<out>/postprocessing.json``, with the table of
candidates in ``<out>/postprocessing.md``:

    python scripts/cross_validate.py --num_folds 5 --choose_postprocessing true --out cv_report
    python -m monai.bundle run --config_file "['configs/inference.json','cv_report/postprocessing.json']" ...
"""

import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed
sys.path.insert(0, str(ROOT / "scripts"))

from ablation import logs_to  # noqa: E402  (each fold's logs go to its folder, as each ablation run's)

from bundle import postprocessing  # noqa: E402
from bundle.datalist import SPLIT_RECORD, check_folds, load_datalist  # noqa: E402
from bundle.files import write_atomic  # noqa: E402

RESULT = "result.json"
#: Keys the script sets per run; an override of them is refused.
RESERVED = ("fold", "bundle_root", "data_list_key")
#: Metrics shown in the README's table (every metric of the evaluation is in the CSVs).
SHOWN = ("dice", "hd95", "precision", "sensitivity")
#: Candidates of --choose_postprocessing: thresholds, and sizes in mm^3 (voxels of the 1 mm BraTS grid), scaled to
#: the data's voxel volume.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
COMPONENT_MM3 = (0, 10, 50, 200)
ET_VOLUME_MM3 = (0, 50, 200, 500)


def _config_path(name: str) -> str:
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return str(path.resolve())
    if (ROOT / path).is_file():
        return str(ROOT / path)
    raise FileNotFoundError(f"config file '{name}' does not exist (looked in the current folder and in {ROOT}).")


def _as_list(value: Union[Sequence[str], str]) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _plain(value):
    """``value`` made JSON-comparable (tuples as lists), so a recorded setting compares equal after a reload."""
    return json.loads(json.dumps(value, default=str))


def resolve_data(configs: Sequence[str], overrides: Mapping[str, Any], work: Path) -> dict:
    """``dataset_dir`` and ``data_list_file_path`` of the training configs, evaluated once (so e.g.
    ``configs/demo.json`` makes its data once, in ``<work_dir>/data/demo``) and passed to every fold as absolute
    paths."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(configs))
    parser.update({**overrides, "bundle_root": str(work)})
    dataset_dir = parser.get_parsed_content("dataset_dir")
    data_list = parser.get_parsed_content("data_list_file_path", default="")
    return {
        "dataset_dir": os.path.abspath(str(dataset_dir)) if dataset_dir else "",
        "data_list_file_path": os.path.abspath(str(data_list)) if data_list else "",
    }


def plan_folds(data: Mapping[str, str], num_folds: int) -> list[list[dict]]:
    """The held-out cases of every fold, ``[[{"case", "grade"}, ...] per fold]``, checked to partition the cases."""
    folds = []
    for fold in range(num_folds):
        items = load_datalist(data["data_list_file_path"], data["dataset_dir"], "validation", num_folds, fold)
        folds.append([{"case": str(item["case"]), "grade": str(item.get("grade") or "")} for item in items])
    training = load_datalist(data["data_list_file_path"], data["dataset_dir"], "training", num_folds, 0)
    every = sorted({str(item["case"]) for item in training} | {c["case"] for c in folds[0]})
    held_out = sorted(c["case"] for fold in folds for c in fold)
    if held_out != every:
        raise RuntimeError(
            f"the {num_folds} folds do not partition the {len(every)} cases (held out: {len(held_out)}, "
            f"{len(set(held_out))} distinct): this is a bug in bundle.datalist.fold_cases."
        )
    return folds


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def run_fold(
    fold: int,
    num_folds: int,
    held_out: Sequence[dict],
    configs: Sequence[str],
    eval_configs: Sequence[str],
    data: Mapping[str, str],
    overrides: Mapping[str, Any],
    run_dir: Path,
    save_probabilities: bool = False,
) -> dict:
    """Train fold ``fold`` into ``run_dir`` and evaluate it on its held-out cases; reuse a finished identical run.

    With ``save_probabilities`` the evaluation also saves the probability maps of the held-out cases in
    ``<run_dir>/eval/probabilities`` (a finished fold without them is evaluated again, not trained again)."""
    from monai.bundle.scripts import run

    record = {
        "num_folds": num_folds,
        "fold": fold,
        "configs": list(configs),
        "eval_configs": list(eval_configs),
        "overrides": _plain({**data, **overrides}),
        "held_out": [c["case"] for c in held_out],
    }
    done = run_dir / RESULT
    if done.is_file():
        result = json.loads(done.read_text(encoding="utf-8"))
        if {k: result.get(k) for k in record} == record:
            print(f"  already done in {run_dir}", flush=True)
            if save_probabilities and _missing_probabilities(run_dir, result["cases"]):
                print("  evaluating again to save the out-of-fold probabilities", flush=True)
                common = {**overrides, **data, "bundle_root": str(run_dir)}
                evaluate_fold(run_dir, eval_configs, common, True)
            return result
        print(f"  fold {fold}: settings or cases changed since it ran, training again", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial or outdated run: start clean
    run_dir.mkdir(parents=True)
    common = {**overrides, **data, "bundle_root": str(run_dir)}
    start = time.perf_counter()
    with logs_to(run_dir / "train.log"):
        run("training", config_file=list(configs), num_folds=num_folds, fold=fold, **common)
    train_seconds = time.perf_counter() - start

    split = json.loads((run_dir / "models" / SPLIT_RECORD).read_text(encoding="utf-8"))
    recorded = sorted(str(item["case"]) for item in split["validation"])
    if recorded != sorted(record["held_out"]):
        raise RuntimeError(
            f"fold {fold}: the split record {run_dir / 'models' / SPLIT_RECORD} holds out {recorded}, not the "
            f"planned {sorted(record['held_out'])}: do the configs override train_datalist / val_datalist?"
        )
    start = time.perf_counter()
    evaluate_fold(run_dir, eval_configs, common, save_probabilities)
    eval_seconds = time.perf_counter() - start

    rows = _read_csv(run_dir / "eval" / "metrics_per_case.csv")
    summary = json.loads((run_dir / "eval" / "metrics_summary.json").read_text(encoding="utf-8"))
    scored = sorted(row["case"] for row in rows)
    if scored != sorted(record["held_out"]):
        raise RuntimeError(f"fold {fold}: evaluation scored {scored}, not the held-out {sorted(record['held_out'])}.")
    grades = {c["case"]: c["grade"] for c in held_out}
    result = {
        **record,
        "metrics": {m: list(regions) for m, regions in summary["metrics"].items()},
        "cases": [{"case": row["case"], "fold": fold, "grade": grades.get(row["case"], ""), **row} for row in rows],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
    }
    write_atomic(str(done), (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return result


def evaluate_fold(run_dir: Path, eval_configs: Sequence[str], common: Mapping[str, Any], save_probabilities: bool):
    """Evaluate the model in ``run_dir`` on its held-out cases (``<run_dir>/eval``); log in ``evaluate.log``."""
    from monai.bundle.scripts import run

    with logs_to(run_dir / "evaluate.log"):
        # no datalist file: evaluation reads the held-out cases from the fold's split record (models/datalist.json)
        eval_settings = {**common, "data_list_file_path": "", "data_list_key": "validation", "progress": False}
        eval_settings["save_probabilities"] = save_probabilities or common.get("save_probabilities", False)
        run("run", config_file=list(eval_configs), **eval_settings)


def _probabilities(run_dir: Path, case: str) -> Path:
    return run_dir / "eval" / "probabilities" / f"{case}.npz"


def _missing_probabilities(run_dir: Path, cases: Sequence[Mapping]) -> list[str]:
    return [str(_probabilities(run_dir, c["case"])) for c in cases if not _probabilities(run_dir, c["case"]).is_file()]


def _flag(value, name: str) -> bool:
    """A command-line switch: ``--name``, ``--name true`` or ``--name false`` (fire passes words as strings)."""
    from monai.utils import str2bool

    try:
        return str2bool(value)
    except ValueError as error:
        raise ValueError(f"--{name} is {value!r}; give true or false.") from error


def _number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarise(results: Sequence[dict]) -> list[dict]:
    """Per metric and region: mean, sample std and number of the finite out-of-fold values over all cases."""
    if not results:
        return []
    cases = [case for r in results for case in r["cases"]]
    rows = []
    for metric, regions in results[0]["metrics"].items():
        for region in regions:
            values = [v for case in cases if (v := _number(case.get(f"{metric}_{region}"))) is not None]
            rows.append(
                {
                    "metric": metric,
                    "region": region,
                    "mean": statistics.fmean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                    "cases": len(values),
                }
            )
    return rows


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_report(out: Path, results: Sequence[dict], num_folds: int, header: str) -> None:
    """``oof_per_case.csv``, ``oof_summary.csv`` and ``README.md`` in ``out`` from the finished folds."""
    out.mkdir(parents=True, exist_ok=True)
    results = sorted(results, key=lambda r: r["fold"])
    if not results:
        return
    metrics = results[0]["metrics"]
    regions = next(iter(metrics.values()))
    columns = [f"{m}_{r}" for m, rs in metrics.items() for r in rs]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "fold", "grade"] + columns)
    for case in sorted((c for r in results for c in r["cases"]), key=lambda c: c["case"]):
        writer.writerow([case["case"], case["fold"], case["grade"]] + [case.get(c, "") for c in columns])
    write_atomic(str(out / "oof_per_case.csv"), buffer.getvalue().encode("utf-8"))

    summary = summarise(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "region", "mean", "std", "cases"])
    for row in summary:
        writer.writerow([row["metric"], row["region"], _fmt(row["mean"], 6), _fmt(row["std"], 6), row["cases"]])
    write_atomic(str(out / "oof_summary.csv"), buffer.getvalue().encode("utf-8"))

    num_cases = sum(len(r["cases"]) for r in results)
    done = [r["fold"] for r in results]
    status = (
        f"all {num_folds} folds done"
        if len(done) == num_folds
        else f"{len(done)} of {num_folds} folds done ({', '.join(map(str, done))}): partial, run the command again"
    )
    by = {(row["metric"], row["region"]): row for row in summary}

    def cell(metric, region):
        row = by.get((metric, region))
        if row is None or row["mean"] is None:
            return "n/a"
        return f"{_fmt(row['mean'], 3 if metric != 'hd95' else 2)} ± {_fmt(row['std'], 3 if metric != 'hd95' else 2)}"

    lines = [header, "", f"Status: {status}; {num_cases} out-of-fold cases.", ""]
    lines += ["### Out-of-fold metrics (mean ± std over cases, each case scored by the model that did not see it)", ""]
    lines += ["| metric | " + " | ".join(regions) + " |", "| --- |" + " --- |" * len(regions)]
    for metric in [m for m in SHOWN if m in metrics] + [m for m in metrics if m not in SHOWN]:
        lines.append(f"| {metric} | " + " | ".join(cell(metric, r) for r in metrics[metric]) + " |")
    dice = [by[("dice", r)]["mean"] for r in regions if ("dice", r) in by and by[("dice", r)]["mean"] is not None]
    if dice:
        lines += ["", f"Mean Dice over the regions: {statistics.fmean(dice):.3f}."]
    lines += ["", "### Per fold (mean Dice of its held-out cases)", ""]
    lines += [
        "| fold | held-out cases | " + " | ".join(regions) + " | training s |",
        "| --- | --- |" + " --- |" * (len(regions) + 1),
    ]
    for r in results:
        cells = []
        for region in regions:
            values = [v for c in r["cases"] if (v := _number(c.get(f"dice_{region}"))) is not None]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "n/a")
        lines.append(f"| {r['fold']} | {len(r['cases'])} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    lines += [
        "",
        "Files: `oof_per_case.csv` (one line per case: its fold, grade and every metric per region), "
        "`oof_summary.csv` (mean, sample std and number of finite values per metric and region).",
    ]
    write_atomic(str(out / "README.md"), ("\n".join(lines) + "\n").encode("utf-8"))


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice as the evaluation scores it (BraTS): 1 when both are empty, 0 when only one is."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


class _OutOfFold:
    """The out-of-fold cases of a finished cross-validation: each case's saved probabilities and its reference
    regions, loaded as the fold's evaluation loads them (``label_transforms`` of the evaluation configs)."""

    def __init__(self, results: Sequence[dict], work: Path, eval_configs: Sequence[str], settings: Mapping):
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        from bundle.cases import case_id

        missing = [p for r in results for p in _missing_probabilities(work / f"fold{r['fold']}", r["cases"])]
        if missing:
            raise FileNotFoundError(
                f"--choose_postprocessing needs the out-of-fold probabilities, and {len(missing)} are missing, e.g. "
                f"{missing[0]}: run the cross-validation again with --choose_postprocessing true (finished folds are "
                "evaluated again, not trained again)."
            )
        self.cases = []  # (case, probabilities file, datalist item, label loader)
        for result in sorted(results, key=lambda r: r["fold"]):
            run_dir = work / f"fold{result['fold']}"
            parser = ConfigParser()
            parser.read_config(list(eval_configs))
            parser.update(
                {**settings, "bundle_root": str(run_dir), "data_list_file_path": "", "data_list_key": "validation"}
            )
            if parser.get_parsed_content("is_multiclass"):
                raise ValueError(
                    "--choose_postprocessing tries thresholds on sigmoid region maps; a multiclass (softmax) model "
                    "has none: set min_component_size and et_min_volume by hand."
                )
            self.regions = dict(parser.get_parsed_content("regions"))
            self.region_labels = [int(v) for v in parser.get_parsed_content("region_labels")]
            self.label_map_regions = {k: list(v) for k, v in parser.get_parsed_content("label_map_regions").items()}
            items = {case_id(item): item for item in parser.get_parsed_content("dataset#data")}
            load_label = Compose(parser.get_parsed_content("label_transforms"))
            for case in result["cases"]:
                self.cases.append(
                    (case["case"], _probabilities(run_dir, case["case"]), items[case["case"]], load_label)
                )
        self.names = list(self.regions)

    def __iter__(self):
        """``(case, probabilities (R, ...), reference regions (R, ...) bool, voxel volume in mm^3)`` per case."""
        for case, path, item, load_label in self.cases:
            prob, names = postprocessing.load_probabilities(path)
            label = load_label(dict(item))["label"]
            if names != self.names or prob.shape != tuple(label.shape):
                raise ValueError(
                    f"{path}: regions {names} of shape {prob.shape}, but the evaluation's reference has regions "
                    f"{self.names} of shape {tuple(label.shape)}: run the cross-validation again."
                )
            spacing = np.asarray(label.pixdim, dtype=float) if hasattr(label, "pixdim") else np.ones(prob.ndim - 1)
            yield case, prob, np.asarray(label) > 0, float(np.prod(spacing))

    def score(self, prob: np.ndarray, ref: np.ndarray, setting: Mapping, cache: dict) -> list[float]:
        """Dice per region of the label map that ``setting`` (threshold, min_component_size, et_min_volume, one value
        per region for the first two) paints from ``prob``, region by region as the evaluation reads it back."""
        maps = []
        for r, (threshold, size) in enumerate(zip(setting["threshold"], setting["min_component_size"])):
            if (r, threshold) not in cache:
                mask = prob[r] >= threshold
                cache[(r, threshold)] = (mask, None)
            mask, components = cache[(r, threshold)]
            if size > 0 and components is None:
                components = postprocessing.component_sizes(mask)
                cache[(r, threshold)] = (mask, components)
            maps.append(postprocessing.remove_small_components(mask, size, components=components))
        maps = np.stack(maps)
        if setting["et_min_volume"] > 0:
            maps = postprocessing.relabel_small_enhancing(
                maps, setting["et_min_volume"], *postprocessing.enhancing_rule_regions(self.regions)
            )
        label = np.zeros(maps.shape[1:], np.uint8)
        for r, value in enumerate(self.region_labels):
            label[maps[r]] = value
        return [_dice(np.isin(label, self.label_map_regions[n]), ref[r]) for r, n in enumerate(self.names)]


def _scaled(sizes_mm3: Sequence[float], voxel_mm3: float) -> list[int]:
    """Sizes in mm^3 as voxel counts of ``voxel_mm3`` voxels, distinct, 0 kept."""
    return sorted({int(round(v / voxel_mm3)) if v else 0 for v in sizes_mm3})


def choose_postprocessing_settings(
    results: Sequence[dict],
    work: Path,
    out: Path,
    eval_configs: Sequence[str] = (),
    settings: Optional[Mapping[str, Any]] = None,
    thresholds: Sequence[float] = THRESHOLDS,
    component_sizes: Optional[Sequence[int]] = None,
    et_volumes: Optional[Sequence[int]] = None,
) -> dict:
    """Choose the post-processing on the saved out-of-fold probabilities; write ``postprocessing.json`` (a config
    overlay) and ``postprocessing.md`` (the candidates) in ``out``, print the table, return the chosen settings.

    One step after the other, as the inference applies them: the threshold of each region, the minimum component
    size of each region, then the enhancing-tumour volume rule (only where an ``enhancing_tumor`` region exists).
    Every candidate of a step is scored with the steps chosen before it; the best is kept only if its out-of-fold
    mean Dice over the regions is higher than with the step off (threshold 0.5, size 0, volume 0): nnU-Net's rule
    (Isensee et al. 2021). The regions a step does not touch keep their Dice, so this is the rule on the mean Dice
    of the regions the step touches. Default sizes are ``COMPONENT_MM3`` and ``ET_VOLUME_MM3`` (mm^3) in voxels of
    the data (their median voxel volume); given ``component_sizes`` and ``et_volumes`` are voxel counts.
    """
    cases = _OutOfFold(results, work, eval_configs, settings or {})
    names = cases.names
    chosen = {"threshold": [0.5] * len(names), "min_component_size": [0] * len(names), "et_min_volume": 0}
    if component_sizes is None or et_volumes is None:
        voxel_mm3 = statistics.median(volume for _, _, _, volume in cases)
        component_sizes = _scaled(COMPONENT_MM3, voxel_mm3) if component_sizes is None else component_sizes
        et_volumes = _scaled(ET_VOLUME_MM3, voxel_mm3) if et_volumes is None else et_volumes
    steps = [("threshold", r, sorted({0.5, *map(float, thresholds)})) for r in range(len(names))]
    steps += [("min_component_size", r, sorted({0, *map(int, component_sizes)})) for r in range(len(names))]
    try:
        steps.append(
            (
                "et_min_volume",
                postprocessing.enhancing_rule_regions(cases.regions)[0],
                sorted({0, *map(int, et_volumes)}),
            )
        )
    except ValueError as error:
        print(f"  et_min_volume not tried: {error}", flush=True)

    def setting_with(key, region, value):
        setting = {k: list(v) if isinstance(v, list) else v for k, v in chosen.items()}
        if key == "et_min_volume":
            setting[key] = value
        else:
            setting[key][region] = value
        return setting

    rows = []
    for number, (key, region, values) in enumerate(steps, 1):
        print(f"  [{number}/{len(steps)}] {key} of {names[region]}: {values}", flush=True)
        scores = {value: [] for value in values}
        for _, prob, ref, _ in cases:
            cache = {}
            for value in values:
                scores[value].append(cases.score(prob, ref, setting_with(key, region, value), cache))
        means = {
            value: [statistics.fmean(case[r] for case in scores[value]) for r in range(len(names))] for value in values
        }
        off = 0.5 if key == "threshold" else 0
        best = max(values, key=lambda v: (statistics.fmean(means[v]), v == off))
        keep = best if statistics.fmean(means[best]) > statistics.fmean(means[off]) else off
        if key == "et_min_volume":
            chosen[key] = keep
        else:
            chosen[key][region] = keep
        for value in values:
            rows.append((key, names[region], value, means[value], value == keep))

    overlay = {
        "threshold": dict(zip(names, chosen["threshold"])),
        "min_component_size": dict(zip(names, chosen["min_component_size"])),
        "et_min_volume": chosen["et_min_volume"],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(str(out / "postprocessing.json"), (json.dumps(overlay, indent=4) + "\n").encode("utf-8"))
    candidates = [
        {"step": key, "region": region, "value": value, "dice": dice, "chosen": kept}
        for key, region, value, dice, kept in rows
    ]
    write_atomic(str(out / "postprocessing_candidates.json"), (json.dumps(candidates, indent=1) + "\n").encode())
    table = ["| step | region | value | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | chosen |"]
    table.append("| --- | --- | --- |" + " --- |" * (len(names) + 2))
    for key, region, value, dice, kept in rows:
        cells = " | ".join(f"{d:.4f}" for d in dice)
        table.append(
            f"| {key} | {region} | {value:g} | {cells} | {statistics.fmean(dice):.4f} | {'yes' if kept else ''} |"
        )
    text = [
        "## Post-processing chosen on the out-of-fold predictions",
        "",
        f"{len(cases.cases)} out-of-fold cases. Each step in turn, scored with the steps chosen above it; a value other "
        "than off (threshold 0.5, size 0, volume 0) is kept only if it raises the out-of-fold mean Dice (nnU-Net's "
        "rule, Isensee et al. 2021). Sizes and volumes in voxels.",
        "",
        *table,
        "",
        "Chosen: `" + json.dumps(overlay) + "`, in `postprocessing.json`; use it as "
        "`--config_file \"['configs/inference.json','" + str(out / "postprocessing.json") + "']\"`.",
    ]
    write_atomic(str(out / "postprocessing.md"), ("\n".join(text) + "\n").encode("utf-8"))
    print("\n".join(table), flush=True)
    print(f"chosen post-processing: {json.dumps(overlay)}; written to {out / 'postprocessing.json'}", flush=True)
    return overlay


def _header(num_folds: int, folds: Sequence[Sequence[dict]], configs, eval_configs, data, overrides, work) -> str:
    options = {"num_folds": num_folds, **overrides}
    command = "python scripts/cross_validate.py " + " ".join(
        f'--{k} "{v!r}"' if isinstance(v, (list, tuple, dict)) else f"--{k} {v}" for k, v in options.items()
    )
    grades = sorted({c["grade"] for fold in folds for c in fold})
    sizes = []
    for i, fold in enumerate(folds):
        per = ", ".join(f"{sum(c['grade'] == g for c in fold)} {g or 'no grade'}" for g in grades)
        sizes.append(f"fold {i}: {len(fold)} ({per})")

    def short(path):
        return os.path.relpath(path, ROOT) if Path(path).is_relative_to(ROOT) else path

    return (
        f"## {num_folds}-fold cross-validation\n\n"
        f"Command: `{command}`\n\n"
        f"Training: `{' + '.join(map(short, configs))}` with `--num_folds {num_folds} --fold <i>`, each fold in "
        f"`{work}/fold<i>`; evaluation: `{' + '.join(map(short, eval_configs))}` on the fold's held-out cases "
        f"(its split record, `models/{SPLIT_RECORD}`). Data: `{data['dataset_dir']}`"
        + (f", datalist `{data['data_list_file_path']}`" if data["data_list_file_path"] else "")
        + f". Folds (per grade, fixed seed): {'; '.join(sizes)}."
    )


def cross_validate(
    num_folds: int = 5,
    configs: Union[Sequence[str], str] = ("configs/train.json",),
    eval_configs: Union[Sequence[str], str, None] = None,
    out: str = "cross_validation",
    work_dir: str = "cross_validation_runs",
    choose_postprocessing: bool = False,
    thresholds: Sequence[float] = THRESHOLDS,
    component_sizes: Optional[Sequence[int]] = None,
    et_volumes: Optional[Sequence[int]] = None,
    **overrides: Any,
) -> None:
    """Train and evaluate every fold of a ``num_folds``-fold cross-validation; write the report to ``out``.

    Args:
        num_folds: number of folds (>= 2, at most the number of cases of each grade).
        configs: training config files, e.g. ``"['configs/train.json','configs/demo.json']"``.
        eval_configs: evaluation configs before ``configs/evaluate.json``; default ``configs/inference.json``
            followed by the overlays of ``configs`` (those after the first).
        out: folder of the report.
        work_dir: folder of every fold's run (``fold<i>``: models, logs, metrics); finished folds there are reused.
        choose_postprocessing: afterwards choose the post-processing on the saved out-of-fold probabilities
            (:func:`choose_postprocessing_settings`) and write it to ``<out>/postprocessing.json``.
        thresholds: candidate thresholds of every region (0.5 is always tried).
        component_sizes: candidate minimum component sizes in voxels (0 always tried); default 10, 50 and 200 mm^3
            in voxels of the data.
        et_volumes: candidate enhancing-tumour volumes in voxels (0 always tried); default 50, 200 and 500 mm^3.
        overrides: config overrides of every training and evaluation, e.g. ``--max_epochs 2 --dataset_dir /data``.

    Every fold's result (settings, per-case metrics, timings) is in ``<work_dir>/fold<i>/result.json``.
    """
    num_folds, _ = check_folds(num_folds, 0)
    choose_postprocessing = _flag(choose_postprocessing, "choose_postprocessing")
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2 to cross-validate, got {num_folds}.")
    reserved = [k for k in RESERVED if k in overrides]
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)} cannot be overridden: the script sets fold (every fold in turn), bundle_root "
            "(<work_dir>/fold<i>; use --work_dir) and data_list_key (validation: the fold's held-out cases)."
        )
    configs = [_config_path(c) for c in _as_list(configs)]
    if eval_configs is None:
        eval_configs = ["configs/inference.json", *configs[1:]]
    eval_configs = [_config_path(c) for c in _as_list(eval_configs)]
    if not any(Path(c).name == "evaluate.json" for c in eval_configs):
        eval_configs.append(_config_path("configs/evaluate.json"))
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = resolve_data(configs, overrides, work)
    given = dict(overrides)
    overrides = {k: v for k, v in overrides.items() if k not in data}
    folds = plan_folds(data, num_folds)
    header = _header(num_folds, folds, configs, eval_configs, data, given, work)

    results, failed, started = [], [], time.perf_counter()
    for fold, held_out in enumerate(folds):
        run_dir = work / f"fold{fold}"
        print(f"[{fold + 1}/{num_folds}] fold {fold}: {len(held_out)} held-out cases ({run_dir})", flush=True)
        try:
            result = run_fold(
                fold, num_folds, held_out, configs, eval_configs, data, overrides, run_dir, choose_postprocessing
            )
        except Exception as error:  # one broken fold must not cost the others' hours; it is retried next time
            print(f"  FAILED: {error!r}; logs in {run_dir}", flush=True)
            failed.append(fold)
            continue
        print(f"  trained in {result['train_seconds']:.0f} s", flush=True)
        results.append(result)
        write_report(Path(out), results, num_folds, header)
    print(f"{num_folds}-fold cross-validation done in {time.perf_counter() - started:.0f} s; report in {out}")
    if failed:
        raise RuntimeError(f"fold(s) {failed} failed: see their logs, fix, and run again (finished folds are kept).")
    if choose_postprocessing:
        print("choosing the post-processing on the out-of-fold probabilities", flush=True)
        grid = {"thresholds": thresholds, "component_sizes": component_sizes, "et_volumes": et_volumes}
        choose_postprocessing_settings(results, work, Path(out), eval_configs, {**overrides, **data}, **grid)


if __name__ == "__main__":
    fire.Fire(cross_validate)
