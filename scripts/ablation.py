"""Which SegAN wins? Train every variant of the paper's section 3.1 and the U-net baseline on the same data,
budget and split, over several seeds, evaluate each on the same held-out cases, and tabulate (Fig. 2, Table 1).

    python scripts/ablation.py                                  # every row, 3 seeds -> docs/ablation/
    python scripts/ablation.py --rows "['S3-3C','U-net']" --seeds 1 --out /tmp/ablation --max_epochs 2

Every run is ``python -m monai.bundle run training`` with ``configs/train.json``, the suite's budget overlay
and the row's overlays (``configs/variants/``), then the evaluation (``configs/inference.json``, the same
budget, ``configs/evaluate.json``) on the suite's ``testing`` cases; both run in this process, one after the
other, with their logs in ``<work_dir>/<suite>/<row>/seed<s>/``.
A run that finished (its ``result.json``, written last, records the same configs and overrides) is not
trained again, so an interrupted ablation continues where it stopped; the report is rewritten after every
run, so it always shows what has finished. Extra ``--key value`` options are config overrides applied to
every run (and recorded, so changing them retrains).

The report in ``out``: ``README.md`` (tables of mean ± std over seeds), ``results.csv`` (one line per row),
``runs.csv`` (one line per run) and ``dice.png`` (Dice per region and row, like the paper's Fig. 2).

Adding a row: ``register(Row("name", overlays=("configs/variants/x.json",), overrides={...}))``, and name it
in a suite's ``rows``; a new dataset: ``SUITES["name"] = Suite(...)`` with a ``prepare`` function that makes
the data and a datalist with ``training``, ``validation`` and ``testing`` sections.
"""

import contextlib
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from bundle.cases import find_cases  # noqa: E402
from bundle.datalist import split_cases  # noqa: E402
from bundle.demo import ensure_demo_data  # noqa: E402
from bundle.files import atomic_path  # noqa: E402

#: Metrics taken from ``configs/evaluate.json``'s ``metrics_summary.json`` (case means per region).
METRICS = ("dice", "precision", "sensitivity", "hd95", "components_pred", "components_label", "outside_head")
#: Row pairs whose paired difference over seeds the report gives (when both rows ran on the same seeds).
PAIRS = (
    ("S3-3C", "U-net"),
    ("S3-3C", "U-net + Dice"),
    ("S3-3C", "S1-1C"),
    ("S3-3C", "S3-1C"),
    ("S3-3C", "S3-3C-s0"),
    ("S3-3C", "S3-3C-s3"),
    ("S3-3C", "S3-3C + Dice"),
    ("S3-3C", "S3-3C literal"),
    ("S3-3C", "S3-3C map"),
    ("S3-3C map", "S3-3C literal"),
    ("S3-3C", "S3-3C mean"),
    ("S3-3C", "S3-3C sum"),
    ("S3-3C", "S3-3C official"),
    ("S3-3C + Dice", "U-net + Dice"),
    ("U-net + Dice", "U-net"),
    ("S3-3C + 2.5D", "S3-3C"),
    ("S3-3C 3D", "S3-3C"),
    ("S3-3C shifted", "S3-3C literal"),
    ("S3-3C shifted", "S3-3C map"),
    ("S3-3C balanced", "S3-3C mean"),
)
#: A validation Dice a region must reach before drops of it count as instability (issue: > 0.2 after 0.8).
STABLE_FROM = 0.8
RESULT = "result.json"


@dataclass(frozen=True)
class Row:
    """One line of the ablation: the config overlays (after the suite's) and overrides that make the method.

    ``eval_overlays``: the overlays evaluation needs on top of ``configs/inference.json`` (those that change
    the segmentor or its input); ``None`` means the same as ``overlays``.
    """

    name: str
    overlays: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    eval_overlays: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Suite:
    """A dataset and a budget shared by every row run on it.

    ``configs``: the base config files of every training run (training config and budget overlay);
    ``eval_configs``: those of every evaluation, ``configs/evaluate.json`` coming after them and the row's
    ``eval_overlays``; ``prepare(work_dir,
    configs, overrides)`` makes the data once and returns the overrides that point the runs at it
    (``dataset_dir`` and a ``data_list_file_path`` whose ``testing`` section is the held-out cases);
    ``rows``: the default rows; ``budget_keys``: config keys the report states.
    """

    name: str
    configs: tuple[str, ...]
    eval_configs: tuple[str, ...]
    prepare: Callable[[Path, Sequence[str], Mapping[str, Any]], dict]
    rows: tuple[str, ...]
    description: str = ""
    budget_keys: tuple[str, ...] = ()


ROWS: dict[str, Row] = {}
SUITES: dict[str, Suite] = {}


def register(row: Row) -> Row:
    """Add ``row`` to the registry (a row of the same name is replaced)."""
    ROWS[row.name] = row
    return row


def _variant(name: str) -> str:
    return f"configs/variants/{name}.json"


register(Row("S3-3C", (_variant("s3_3c"),), description="the paper's model: 3 maps, one critic per region"))
register(Row("S1-1C", (_variant("s1_1c"),), description="one single-map SegAN per region"))
register(Row("S3-1C", (_variant("s3_1c"),), description="3 maps, one joint critic"))
register(Row("S3-3C-s0", (_variant("s3_3c_s0"),), description="loss on the masked input only (layer 0)"))
register(Row("S3-3C-s3", (_variant("s3_3c_s3"),), description="loss on the last critic layer only"))
register(Row("S3-3C + Dice", (_variant("s3_3c"),), {"dice_weight": 1.0}, "adversarial + soft Dice term"))
register(
    Row(
        "S3-3C + 2.5D",
        (_variant("s3_3c"), _variant("context_2_5d")),
        description="S3-3C fed slices z-1, z, z+1 of every modality (beyond the paper)",
    )
)
register(
    Row("U-net", (_variant("unet"),), description="same segmentor, per-region cross-entropy only", eval_overlays=())
)
register(
    Row(
        "U-net + Dice",
        (_variant("unet"),),
        {"dice_weight": 1.0},
        "same segmentor, cross-entropy + soft Dice (nnU-Net's loss)",
        eval_overlays=(),
    )
)
register(
    Row(
        "S3-3C literal",
        (_variant("s3_3c"),),
        {"critic_input": "masked"},
        "S3-3C with the paper's literal critic input x o S(x) (no gradient where the image is 0)",
    )
)
register(
    Row(
        "S3-3C map",
        (_variant("s3_3c"),),
        {"critic_input": "masked_map"},
        "S3-3C, critics see x o S(x) and the map S(x) as one more channel",
    )
)
register(
    Row(
        "S3-3C shifted",
        (_variant("s3_3c"),),
        {"critic_input": "shifted"},
        "S3-3C, critics see (x - min x + 1) o S(x): no zero-valued voxel",
    )
)
register(
    Row(
        "S3-3C 3D",
        (_variant("s3_3c"), _variant("segan3d"), _variant("segan3d_demo")),
        description="S3-3C with 3D networks on 32^3 patches, sliding-window inference (beyond the paper)",
        eval_overlays=("configs/segan3d_inference.json", _variant("segan3d_demo")),
    )
)
for _view, _axis in (("sagittal", 0), ("coronal", 1)):
    register(
        Row(
            f"S3-3C {_view}",
            (_variant("s3_3c"),),
            {"slice_axis": _axis},
            f"S3-3C trained and run along the stored axis {_axis} ({_view} slices of BraTS-layout volumes)",
        )
    )
for _weighting in ("mean", "sum", "official", "balanced"):
    register(
        Row(
            f"S3-3C {_weighting}",
            (_variant("s3_3c"),),
            {"loss_weighting": _weighting},
            f"S3-3C with loss_weighting {_weighting}",
        )
    )


def _parser(configs: Sequence[str], overrides: Mapping[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in configs])
    parser.update(dict(overrides))
    return parser


def prepare_demo(work_dir: Path, configs: Sequence[str], overrides: Mapping[str, Any]) -> dict:
    """The demo data of the budget overlay (``demo_num_cases``, ``demo_shape``, ``demo_difficulty``) in
    ``work_dir``; the last ``demo_test_cases`` cases are held out for testing, the others split 9:1 (seed 0)
    into training and validation (model selection)."""
    parser = _parser(configs, overrides)
    num_cases, num_test = int(parser.get_parsed_content("demo_num_cases")), int(
        parser.get_parsed_content("demo_test_cases")
    )
    if num_cases < num_test + 2:
        raise ValueError(
            f"demo_num_cases {num_cases} leaves fewer than 2 cases for training and validation after "
            f"demo_test_cases {num_test}: raise --demo_num_cases or lower --demo_test_cases."
        )
    data_dir = work_dir / "data"
    ensure_demo_data(
        data_dir,
        num_cases=num_cases,
        shape=parser.get_parsed_content("demo_shape"),
        difficulty=parser.get_parsed_content("demo_difficulty"),
        frame=parser.get_parsed_content("demo_frame", default=None),
        progress=True,
    )
    cases = find_cases(data_dir)
    testing = cases[-num_test:]
    training, validation = split_cases(cases[:-num_test], val_fraction=0.1, seed=0)
    datalist = {"training": training, "validation": validation, "testing": testing}
    path = work_dir / "datalist.json"
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        json.dump(datalist, f, indent=2)
    return {"dataset_dir": str(data_dir), "data_list_file_path": str(path)}


SUITES["demo"] = Suite(
    name="demo",
    configs=("configs/train.json", "configs/demo.json", _variant("ablation_demo")),
    eval_configs=("configs/inference.json", "configs/demo.json", _variant("ablation_demo")),
    prepare=prepare_demo,
    # Table 1's variants and the U-net, then the baselines and settings the defaults were chosen against (the
    # default S3-3C is the shifted critic input with balanced layer weighting: no "S3-3C shifted"/"balanced" row)
    rows=(
        "S1-1C",
        "S3-1C",
        "S3-3C",
        "S3-3C-s0",
        "S3-3C-s3",
        "S3-3C + Dice",
        "S3-3C + 2.5D",
        "U-net",
        "U-net + Dice",
        "S3-3C literal",
        "S3-3C map",
        "S3-3C mean",
        "S3-3C sum",
        "S3-3C official",
        "S3-3C 3D",
    ),
    description="the synthetic BraTS-like demo (bundle.demo) made harder with demo_difficulty",
    budget_keys=(
        "demo_difficulty",
        "demo_shape",
        "features",
        "critic_features",
        "patch_size",
        "slices_per_volume",
        "volumes_per_batch",
        "max_epochs",
        "val_interval",
        "optimizer_name",
        "learning_rate",
        "lr_step_epochs",
        "lr_gamma",
    ),
)


SUITES["brats_sized"] = Suite(
    name="brats_sized",
    configs=("configs/train.json", "configs/demo.json", _variant("brats_sized")),
    eval_configs=("configs/inference.json", "configs/demo.json", _variant("brats_sized")),
    prepare=prepare_demo,
    rows=("S3-3C literal", "S3-3C map", "S3-3C shifted"),
    description=(
        "phantom heads (160x196x155) centred in the BraTS frame (240x240x155) of air, with the paper's "
        "180x180x128 crop and 160x160 patches, demo widths"
    ),
    budget_keys=(
        "demo_shape",
        "demo_frame",
        "crop_size",
        "patch_size",
        "features",
        "critic_features",
        "max_epochs",
        "val_interval",
        "head_guard",
        "dice_weight",
    ),
)


# Moeskops et al. 2017: the paper's four rows, the FCN and the dilated network each without and with the
# discriminator, on the demo suite's data and budget. The BraTS labels are 4 mutually exclusive classes (softmax)
# here, not nested regions, so these rows have a suite (and a table) of their own. The CPU budget halves the
# widths: 16 kernels per 3x3 layer (the paper: 32), 64 in the FCN's 1x1 layer (256) and the discriminator's fully
# connected layer (256).
_MOESKOPS = "configs/moeskops/{}.json"
for _name, _network, _widths in (
    ("FCN", "fcn", {"network_def#features": 16, "network_def#hidden": 64}),
    ("Dilated", "dilated", {"network_def#features": 16}),
):
    _overlays = (_MOESKOPS.format("multiclass"), _MOESKOPS.format(_network))
    register(
        Row(
            _name,
            (_variant("unet"), *_overlays),
            _widths,
            f"{_name.lower()} network, cross-entropy only",
            eval_overlays=_overlays,
        )
    )
    register(
        Row(
            f"{_name} + adversarial",
            (*_overlays, _MOESKOPS.format("adversarial")),
            {**_widths, "discriminator_features": 16, "discriminator_hidden": 64},
            f"{_name.lower()} network, cross-entropy and the discriminator (Ls, Ld, La)",
            eval_overlays=_overlays,
        )
    )

SUITES["moeskops"] = Suite(
    name="moeskops",
    configs=SUITES["demo"].configs,
    eval_configs=SUITES["demo"].eval_configs,
    prepare=prepare_demo,
    rows=("FCN", "FCN + adversarial", "Dilated", "Dilated + adversarial"),
    description="Moeskops et al. 2017 on the demo suite's data; BraTS labels as 4 mutually exclusive classes",
)


def prepare_lesion_demo(work_dir: Path, configs: Sequence[str], overrides: Mapping[str, Any]) -> dict:
    """The synthetic dermoscopy images of ``configs/isic_demo.json`` (``lesion_demo_images``) in ``work_dir``, in
    the ISIC 2017 layout: its training, validation and test sets are the runs' (``testing`` held out)."""
    from bundle.lesion_demo import ensure_lesion_demo

    images = _parser(configs, overrides).get_parsed_content("lesion_demo_images")
    return {"dataset_dir": ensure_lesion_demo(work_dir / "data", num_images=images, progress=True)}


register(
    Row(
        "SegAN",
        (),
        description="the ISIC re-implementation report's recipe: one lesion map, one critic, multi-scale L1 loss",
    )
)
register(Row("SegAN + Dice", (), {"dice_weight": 1.0}, "adversarial + soft Dice term"))

SUITES["isic"] = Suite(
    name="isic",
    configs=("configs/train.json", "configs/adam.json", "configs/isic.json", "configs/isic_demo.json"),
    eval_configs=("configs/inference.json", "configs/isic_inference.json", "configs/isic_demo.json"),
    prepare=prepare_lesion_demo,
    rows=("SegAN", "SegAN + Dice", "U-net"),
    description="synthetic 2D RGB skin lesions in the ISIC 2017 layout (bundle.lesion_demo), 64x64 inputs",
)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.replace(" + ", "+")).replace("+", "_plus_")


def _count_parameters(configs: Sequence[str], overrides: Mapping) -> tuple[int, int]:
    """Parameters of the segmentor and (0 when the trainer has none) of the critics."""
    parser = _parser(configs, overrides)
    network = parser.get_parsed_content("network_def")
    count = sum(p.numel() for p in network.parameters())
    uses_critic = parser.get("critic") is not None  # the U-net baseline's overlay sets no critic
    critic = sum(p.numel() for p in parser.get_parsed_content("critic_def").parameters()) if uses_critic else 0
    return int(count), int(critic)


@contextlib.contextmanager
def logs_to(path: Path):
    """Send everything written to this process's stdout and stderr to ``path`` (at the file-descriptor level,
    so logging handlers made earlier with the real streams are redirected too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _run_one(suite: Suite, row: Row, seed: int, run_dir: Path, data_overrides: dict, overrides: dict) -> dict:
    from monai.bundle.scripts import run

    configs = [*suite.configs, *row.overlays]
    eval_overlays = row.overlays if row.eval_overlays is None else row.eval_overlays
    eval_configs = [*suite.eval_configs, *eval_overlays, "configs/evaluate.json"]
    settings = {**data_overrides, **row.overrides, **overrides, "seed": seed}
    record = {
        "suite": suite.name,
        "row": row.name,
        "seed": seed,
        "configs": configs,
        "eval_configs": eval_configs,
        "overrides": settings,
    }
    done = run_dir / RESULT
    if done.is_file():
        result = json.loads(done.read_text(encoding="utf-8"))
        if {k: result.get(k) for k in record} == record:
            print(f"  already done in {run_dir}", flush=True)
            return result
        print(f"  {row.name} seed {seed}: settings changed since it ran, training again", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial or outdated run: start clean
    run_dir.mkdir(parents=True)
    common = {"bundle_root": str(run_dir), **settings}
    start = time.perf_counter()
    with logs_to(run_dir / "train.log"):
        run("training", config_file=[str(ROOT / c) for c in configs], **common)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with logs_to(run_dir / "evaluate.log"):
        run("run", config_file=[str(ROOT / c) for c in eval_configs], data_list_key="testing", progress=False, **common)
    eval_seconds = time.perf_counter() - start
    summary = json.loads((run_dir / "eval" / "metrics_summary.json").read_text(encoding="utf-8"))
    parameters, critic_parameters = _count_parameters(configs, settings)
    history_path = run_dir / "eval" / "validation_metrics.json"
    history = json.loads(history_path.read_text(encoding="utf-8"))["history"] if history_path.is_file() else []
    result = {
        **record,
        "num_test_cases": summary["num_cases"],
        "metrics": {m: {r: v["mean"] for r, v in summary["metrics"][m].items()} for m in METRICS},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "parameters": parameters,
        "critic_parameters": critic_parameters,
        "largest_drop": largest_drops(history),
        "loss_shares": last_loss_shares((run_dir / "train.log").read_text(encoding="utf-8", errors="replace")),
    }
    with atomic_path(done) as tmp, open(tmp, "x", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def largest_drops(history: Sequence[Mapping[str, Any]], prefix: str = "val_dice_") -> dict[str, float]:
    """Per region, the largest fall of validation Dice between consecutive validations after the region first
    reached ``STABLE_FROM`` (0 when it never fell, NaN when it never reached it): the game's stability."""
    regions = sorted({k[len(prefix) :] for h in history for k in h if k.startswith(prefix)})
    drops = {}
    for region in regions:
        values = [h.get(prefix + region) for h in history]
        values = [v for v in values if v is not None]
        start = next((i for i, v in enumerate(values) if v >= STABLE_FROM), None)
        if start is None:
            drops[region] = math.nan
            continue
        after = values[start:]
        drops[region] = round(max([0.0] + [a - b for a, b in zip(after, after[1:])]), 4)
    return drops


def last_loss_shares(log: str) -> dict[str, list[float]]:
    """Each critic layer's share of its critic's adversarial loss in the last epoch, from ``LossShareLogger``'s log
    line (``{critic: [share of layer 0, 1, ...]}``, each row summing to 1); empty for a trainer without critics."""
    marker = "share of the adversarial loss per critic layer (0 = masked input): "
    lines = [line for line in log.splitlines() if marker in line]
    if not lines:
        return {}
    shares = {}
    for part in lines[-1].split(marker, 1)[1].split("; "):
        name, _, values = part.partition(": ")
        row = [float(v) for v in values.split()]
        shares[name.strip()] = [v / (sum(row) or 1.0) for v in row]  # each critic's row sums to 1
    return shares


def paired_difference(results: Sequence[dict], first: str, second: str) -> Optional[dict]:
    """Mean over seeds of ``first``'s mean test Dice minus ``second``'s, run on the same seeds, with its 95 %
    t-interval (None when fewer than 2 seeds are shared)."""

    def by_seed(name):
        return {
            r["seed"]: statistics.fmean(v for v in r["metrics"]["dice"].values() if v is not None)
            for r in results
            if r["row"] == name
        }

    a, b = by_seed(first), by_seed(second)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = _T95.get(len(seeds) - 1, 1.96) * std / math.sqrt(len(seeds))
    return {
        "first": first,
        "second": second,
        "seeds": len(seeds),
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
    }


#: Two-sided 95 % quantiles of Student's t by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _cell(stats: tuple[Optional[float], Optional[float]], digits: int = 3) -> str:
    mean, std = stats
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(results: Sequence[dict], row_order: Sequence[str]) -> list[dict]:
    """One summary per row: mean and std over seeds of each metric (region means over the test cases)."""
    summaries = []
    for name in row_order:
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        regions = list(runs[0]["metrics"]["dice"])
        summary = {
            "row": name,
            "description": ROWS[name].description if name in ROWS else "",
            "seeds": len(runs),
            "regions": regions,
            "mean_dice": _mean_std([statistics.fmean(r["metrics"]["dice"].values()) for r in runs]),
            "train_seconds": _mean_std([r["train_seconds"] for r in runs]),
            "parameters": runs[0]["parameters"],
            "critic_parameters": runs[0]["critic_parameters"],
        }
        for metric in METRICS:
            for region in regions:
                summary[f"{metric}_{region}"] = _mean_std([r["metrics"].get(metric, {}).get(region) for r in runs])
        for region in regions:
            summary[f"drop_{region}"] = _mean_std([r.get("largest_drop", {}).get(region) for r in runs])
            summary[f"max_drop_{region}"] = max(
                [d for r in runs if (d := r.get("largest_drop", {}).get(region)) is not None and math.isfinite(d)],
                default=None,
            )
        shares = [
            {c: [v / (sum(row) or 1.0) for v in row] for c, row in r["loss_shares"].items()}
            for r in runs
            if r.get("loss_shares")
        ]  # each critic's row sums to 1
        summary["loss_shares"] = (
            {
                critic: [round(statistics.fmean(s[critic][i] for s in shares), 3) for i in range(len(values))]
                for critic, values in shares[0].items()
            }
            if shares
            else {}
        )
        summaries.append(summary)
    return summaries


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)


def _short(region: str) -> str:
    return {"whole_tumor": "whole", "tumor_core": "core", "enhancing_tumor": "enhancing"}.get(region, region)


def write_report(out: Path, suite: Suite, results: Sequence[dict], row_order: Sequence[str], header: str) -> None:
    """``README.md``, ``results.csv``, ``runs.csv`` and ``dice.png`` in ``out`` from the finished runs."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarise(results, row_order)
    if not summaries:
        return
    regions = summaries[0]["regions"]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["mean_dice"] + [f"{m}_{r}" for m in METRICS for r in regions] + ["train_seconds"]
    writer.writerow(
        ["row", "seeds"]
        + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
        + ["parameters", "critic_parameters", "description"]
    )
    for s in summaries:
        values = [v for c in columns for v in s[c]]
        writer.writerow(
            [s["row"], s["seeds"]]
            + ["" if v is None else f"{v:.6g}" for v in values]
            + [s["parameters"], s["critic_parameters"], s["description"]]
        )
    _write_text(out / "results.csv", buffer.getvalue())

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["row", "seed"]
        + [f"{m}_{r}" for m in METRICS for r in regions]
        + ["train_seconds", "eval_seconds", "parameters", "critic_parameters"]
    )
    for r in sorted(results, key=lambda r: (list(row_order).index(r["row"]), r["seed"])):
        writer.writerow(
            [r["row"], r["seed"]]
            + [r["metrics"][m][g] for m in METRICS for g in regions]
            + [r["train_seconds"], r["eval_seconds"], r["parameters"], r["critic_parameters"]]
        )
    _write_text(out / "runs.csv", buffer.getvalue())

    names = [_short(r) for r in regions]
    lines = [header, "", "### Dice on the held-out cases (mean ± std over seeds)", ""]
    lines += ["| method | seeds | " + " | ".join(names) + " | mean |", "| --- | --- |" + " --- |" * (len(names) + 1)]
    for s in summaries:
        cells = [_cell(s[f"dice_{r}"]) for r in regions] + [_cell(s["mean_dice"])]
        lines.append(f"| {s['row']} | {s['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "### Precision and sensitivity", ""]
    lines += [
        "| method | "
        + " | ".join(f"precision {n}" for n in names)
        + " | "
        + " | ".join(f"sensitivity {n}" for n in names)
        + " |",
        "| --- |" + " --- |" * (2 * len(names)),
    ]
    for s in summaries:
        cells = [_cell(s[f"precision_{r}"]) for r in regions] + [_cell(s[f"sensitivity_{r}"]) for r in regions]
        lines.append(f"| {s['row']} | " + " | ".join(cells) + " |")
    lines += ["", "### 3D components (prediction; ground truth in the header), HD95 (mm), cost", ""]
    truth = [_cell(summaries[0][f"components_label_{r}"], 1).split(" ±")[0] for r in regions]
    lines += [
        "| method | "
        + " | ".join(f"components {n} (truth {t})" for n, t in zip(names, truth))
        + " | "
        + " | ".join(f"HD95 {n}" for n in names)
        + " | training s | parameters (segmentor / critics) |",
        "| --- |" + " --- |" * (2 * len(names) + 2),
    ]
    for s in summaries:
        cells = [_cell(s[f"components_pred_{r}"], 1) for r in regions] + [_cell(s[f"hd95_{r}"], 1) for r in regions]
        cells += [_cell(s["train_seconds"], 0), f"{s['parameters']:,} / {s['critic_parameters']:,}"]
        lines.append(f"| {s['row']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"### Stability: largest fall of validation Dice after first reaching {STABLE_FROM}",
        "",
        "Between consecutive validations, per region: mean ± std over seeds, and the worst seed "
        "(n/a: never reached it).",
        "",
    ]
    lines += ["| method | " + " | ".join(names) + " | worst seed |", "| --- |" + " --- |" * (len(names) + 1)]
    for s in summaries:
        worst = [s[f"max_drop_{r}"] for r in regions]
        cells = [_cell(s[f"drop_{r}"]) for r in regions]
        cells.append(" / ".join("n/a" if w is None else f"{w:.3f}" for w in worst))
        lines.append(f"| {s['row']} | " + " | ".join(cells) + " |")
    outside = [s for s in summaries if any(s.get(f"outside_head_{r}", (None,))[0] is not None for r in regions)]
    if outside:
        lines += ["", "### Voxels labelled outside the head (per test case; mean ± std over seeds)", ""]
        lines += ["| method | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for s in outside:
            lines.append(f"| {s['row']} | " + " | ".join(_cell(s[f"outside_head_{r}"], 0) for r in regions) + " |")
    with_shares = [s for s in summaries if s["loss_shares"]]
    if with_shares:
        lines += ["", "### Each critic layer's share of the adversarial loss, last epoch (layer 0 = masked input)", ""]
        lines += ["| method | critic | shares |", "| --- | --- | --- |"]
        for s in with_shares:
            for critic, values in s["loss_shares"].items():
                lines.append(f"| {s['row']} | {critic} | " + " / ".join(f"{v:.3f}" for v in values) + " |")
    pairs = [d for a, b in PAIRS if (d := paired_difference(results, a, b)) is not None]
    if pairs:
        lines += ["", "### Paired differences of mean test Dice (same seeds; 95 % t-interval)", ""]
        lines += [
            "| first − second | seeds | difference | 95 % interval | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for d in pairs:
            verdict = "first better" if d["low"] > 0 else "second better" if d["high"] < 0 else "no difference shown"
            lines.append(
                f"| {d['first']} − {d['second']} | {d['seeds']} | {d['mean']:+.3f} | "
                f"[{d['low']:+.3f}, {d['high']:+.3f}] | {verdict} |"
            )
    lines += ["", "| method | what |", "| --- | --- |"] + [f"| {s['row']} | {s['description']} |" for s in summaries]
    _write_text(out / "README.md", "\n".join(lines) + "\n")
    _write_text_bytes(out / "dice.png", _bar_chart(summaries, regions))


def _write_text_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def _bar_chart(summaries: Sequence[dict], regions: Sequence[str]) -> bytes:
    """Grouped bars of Dice per region, one bar per row with its std over seeds (the paper's Fig. 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * len(summaries) * len(regions) / 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(summaries)
    for i, s in enumerate(summaries):
        means = [s[f"dice_{r}"][0] or 0.0 for r in regions]
        stds = [s[f"dice_{r}"][1] or 0.0 for r in regions]
        xs = [g + (i - (len(summaries) - 1) / 2) * width for g in range(len(regions))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"{s['row']} (n={s['seeds']})")
    ax.set_xticks(range(len(regions)), [_short(r) for r in regions])
    ax.set_ylabel("Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=2, loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _header(suite: Suite, rows, seeds: int, overrides: Mapping, data_overrides: Mapping) -> str:
    """What the report was made with: the command, the configs, the budget's values, the data split."""
    options = {"rows": rows, "seeds": seeds, "suite": suite.name, **overrides}
    command = "python scripts/ablation.py " + " ".join(
        f'--{k} "{v!r}"' if isinstance(v, (list, tuple, dict)) else f"--{k} {v}"
        for k, v in options.items()
        if v is not None
    )
    parser = _parser(suite.configs, {**overrides, **data_overrides})
    budget = ", ".join(f"`{k}` {parser.get_parsed_content(k)}" for k in suite.budget_keys)
    data = "the same training, validation (model selection) and held-out test cases for every run"
    if data_overrides.get("data_list_file_path"):
        with open(data_overrides["data_list_file_path"], encoding="utf-8") as f:
            split = {k: len(v) for k, v in json.load(f).items()}
        data = (
            f"{split.get('training', 0)} training, {split.get('validation', 0)} validation (model selection) and "
            f"{split.get('testing', 0)} held-out test cases, the same for every run"
        )
    return (
        f"## Ablation: suite `{suite.name}`, {suite.description}\n\n"
        f"Command: `{command}`\n\n"
        f"Every row trains with `{' + '.join(suite.configs)}` plus its own overlay, and is evaluated with "
        f"`{' + '.join(suite.eval_configs)}` + `configs/evaluate.json`. Budget: {budget or 'the configs above'}. "
        f"Data: {data}. Metrics are case means over the test cases, then mean ± sample standard deviation over seeds."
    )


def ablation(
    rows: Union[Sequence[str], str, None] = None,
    seeds: int = 3,
    suite: str = "demo",
    out: Optional[str] = None,
    work_dir: str = "ablation_runs",
    first_seed: int = 0,
    **overrides: Any,
) -> None:
    """Train and evaluate ``rows`` (default: the suite's) for ``seeds`` seeds each; write the report to ``out``.

    Args:
        rows: row names (see ``ROWS``), e.g. ``"['S3-3C','U-net']"``; default: every row of the suite.
        seeds: seeds per row (``first_seed``, ``first_seed + 1``, ...): the spread over seeds is reported.
        suite: the dataset and budget (see ``SUITES``).
        out: folder of the report; default ``docs/ablation`` for the ``demo`` suite, ``docs/ablation/<suite>`` else.
        work_dir: folder of the data and of every run (models, logs, metrics); finished runs there are reused.
        overrides: config overrides applied to every run, e.g. ``--max_epochs 2``.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}': choose one of {sorted(SUITES)}.")
    the_suite = SUITES[suite]
    out = out or ("docs/ablation" if suite == "demo" else f"docs/ablation/{suite}")
    names = list(the_suite.rows if rows is None else ([rows] if isinstance(rows, str) else rows))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}: choose from {list(ROWS)} (or register() new ones).")
    if int(seeds) < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    work = Path(work_dir).resolve() / suite
    work.mkdir(parents=True, exist_ok=True)
    data_overrides = the_suite.prepare(work, the_suite.configs, overrides)
    plan = [(ROWS[n], first_seed + s) for n in names for s in range(int(seeds))]
    header = _header(the_suite, names if rows is not None else None, seeds, overrides, data_overrides)
    results, failed, started = [], [], time.perf_counter()
    for i, (row, seed) in enumerate(plan, 1):
        run_dir = work / _slug(row.name) / f"seed{seed}"
        print(f"[{i}/{len(plan)}] {row.name}, seed {seed} ({run_dir})", flush=True)
        try:
            result = _run_one(the_suite, row, seed, run_dir, data_overrides, overrides)
        except Exception as error:  # one broken row must not cost the others' hours; it is retried next time
            print(f"  FAILED: {error!r}; logs in {run_dir}", flush=True)
            failed.append(f"{row.name} seed {seed}")
            continue
        dice = result["metrics"]["dice"]
        print(
            f"  trained in {result['train_seconds']:.0f} s; test Dice "
            + ", ".join(f"{_short(r)} {v:.3f}" for r, v in dice.items() if v is not None),
            flush=True,
        )
        results.append(result)
        write_report(Path(out), the_suite, results, names, header)
    print(f"ablation of {len(plan)} runs done in {time.perf_counter() - started:.0f} s; report in {out}", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their logs, fix, and run again.")


if __name__ == "__main__":
    fire.Fire(ablation)
