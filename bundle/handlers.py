"""Evaluation handlers: a per-case metric report and an overlay figure of the segmentations.

Both are ignite handlers written like MONAI's (``attach(engine)``, ``__call__(engine)``, a ``logging``
logger) and are meant for the ``handlers`` of a ``monai.engines.SupervisedEvaluator`` that runs over whole
3D cases (the 2D SegAN segmentor applied slice by slice and restacked, SPEC section 2).

- :class:`SegmentationReport` turns the per-case details of MONAI's metric handlers (``save_details=True``)
  into one CSV row per case and a JSON summary of mean and standard deviation per metric and region: the
  numbers of the SegAN paper's Table 1 (Dice, precision, sensitivity per region), plus IoU (seed 004),
  HD95 and the connected-component count of Moeskops et al. 2017 (seed 002, :mod:`bundle.metrics`).
- :class:`OverlayFigure` draws, for a few cases, the axial slice with the most tumour: the image, the
  ground truth and the prediction, coloured as in the SegAN paper's Fig. 3.

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a crash or a
second reader never sees a half-written report.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import decollate_batch
from monai.handlers import ConfusionMatrix
from monai.metrics import compute_confusion_matrix_metric
from monai.utils import IgniteInfo, ensure_tuple, min_version, optional_import, string_list_all_gather

from .constants import strip_image_suffix
from .files import atomic_path

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["SegmentationReport", "OverlayFigure", "ValidationHistory", "FIG3_COLORS", "trained_weights"]

#: Region colours of the SegAN paper's Fig. 3, in region order: whole tumour, tumour core, enhancing tumour.
FIG3_COLORS = ("yellow", "blue", "red")



def trained_weights(path: str, network: torch.nn.Module | None = None) -> str:
    """``path`` if it holds weights that fit ``network``, for a ``CheckpointLoader``; otherwise an error saying why.

    Inference and evaluation load the segmentor's weights (a flat state dict) from ``models/model.pt``, which
    training writes. A missing file, or weights trained with other ``features`` or ``modalities`` (the demo
    overlay trains a narrower network), fail here with what to do, instead of as a bare ``torch.load`` or
    ``load_state_dict`` error later.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no trained weights at '{path}'. Train first (python -m monai.bundle run training --config_file "
            "configs/train.json --dataset_dir <data>), which writes models/model.pt, or point --ckpt_path at a "
            "model.pt (a state dict of network_def, trained with the same `features` and `modalities`)."
        )
    if network is None:
        return path
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a {"model": state dict} checkpoint, which CheckpointLoader also accepts
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict of network_def.")
    expected = network.state_dict()
    if set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()):
        return path
    hint = ""
    convs = sorted((k for k in state if _ENCODER_CONV.fullmatch(k)), key=_natural)
    if convs:  # a SegANSegmentor: its encoder convolutions tell the widths and input channels it was made with
        widths = [int(state[k].shape[0]) for k in convs]
        hint = f" It holds a segmentor with features {widths} and {int(state[convs[0]].shape[1])} input channel(s)."
    raise ValueError(
        f"the weights in '{path}' do not fit network_def.{hint} Run with the settings it was trained with, "
        "e.g. --features \"[16, 32, 64, 128]\" for a model trained with configs/demo.json, and the same "
        "`modalities` and `regions`."
    )


_ENCODER_CONV = re.compile(r"encoder\.\d+\.conv\.weight")


def latest_training_state(state_dir: str) -> str:
    """The newest full training state in ``state_dir``, for ``--resume true``.

    Training saves the state every ``val_interval`` epochs (``checkpoint_epoch=N.pt``) and at the end or on
    an error (``training_state.pt``); a run killed from outside (a scheduler's time limit, a lost node)
    leaves only the periodic file, so the newest of them is what to resume from.
    """
    candidates = glob.glob(os.path.join(state_dir, "checkpoint_epoch=*.pt"))
    candidates += glob.glob(os.path.join(state_dir, "training_state.pt"))
    if not candidates:
        raise FileNotFoundError(
            f"nothing to resume from: no training_state.pt or checkpoint_epoch=*.pt in '{state_dir}'. Drop "
            "--resume, or point --state_dir at the checkpoints folder of the run to continue."
        )
    return max(candidates, key=os.path.getmtime)


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so ``path`` is never partial."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _as_items(data: Any) -> list:
    """The per-case items of ``engine.state.batch`` / ``output``, whether the evaluator decollated them or not."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        return list(decollate_batch(data, detach=True))
    return list(data)


def _case_id(item: Any, case_key: str, image_key: str = "image") -> str | None:
    """Case id of one decollated item: ``item[case_key]``, else the image file name without its extension."""
    if not isinstance(item, Mapping):
        return None
    if case_key in item and item[case_key] is not None:
        return str(item[case_key])
    filename = None
    image = item.get(image_key)
    meta = getattr(image, "meta", None)
    if isinstance(meta, Mapping):
        filename = meta.get("filename_or_obj")
    if filename is None and isinstance(item.get(f"{image_key}_meta_dict"), Mapping):
        filename = item[f"{image_key}_meta_dict"].get("filename_or_obj")
    if isinstance(filename, (list, tuple)) and filename:  # multi-file case: name it after the first file
        filename = filename[0]
    if filename is None or not isinstance(filename, (str, os.PathLike)) or not str(filename):
        return None
    return strip_image_suffix(os.path.basename(str(filename)))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class SegmentationReport:
    """Per-case and summary report of the evaluator's metrics, per region.

    On every iteration it records the case ids of the batch; when the epoch completes it reads
    ``engine.state.metric_details`` (filled by MONAI metric handlers with ``save_details=True``, e.g.
    ``MeanDice``, ``ConfusionMatrix``, ``MeanIoUHandler``, ``HausdorffDistance`` and
    :class:`bundle.metrics.ComponentCount`) and writes:

    - ``csv_name``: one row per case, columns ``case`` then ``<metric>_<region>`` for each metric and region;
    - ``summary_name``: ``{"num_cases": N, "metrics": {metric: {region: {"mean": m, "std": s}}}}``, where the
      mean and (population) standard deviation ignore NaN cases (e.g. Dice of a region absent from both
      the label and the prediction); a value that is not finite (all cases NaN, or an infinite distance)
      is written as ``null``.

    It also logs a table of mean ± std per metric and region. ``ConfusionMatrix`` handlers keep the raw
    TP/FP/TN/FN per case as details; they are turned into the handler's ``metric_name`` (e.g. precision)
    per case here. In a distributed run the case ids of all ranks are gathered and rank 0 writes the files.

    Args:
        output_dir: folder of the two files (created if missing).
        region_names: names of the region channels, in channel order, e.g.
            ``["whole_tumor", "tumor_core", "enhancing_tumor"]``.
        metric_names: names of the metrics to report, as attached to the evaluator (``key_metric`` /
            ``additional_metrics`` keys); ``None`` reports every metric with saved details.
        case_key: batch key holding the case id; if absent the image's ``filename_or_obj`` is used, without
            folder and ``.nii.gz`` / ``.nii`` / ``.mha`` extension.
        csv_name: file name of the per-case CSV.
        summary_name: file name of the JSON summary.
        confusion_metric_names: ``{metric name: confusion-matrix metric}`` for details that hold raw confusion
            matrices, e.g. ``{"val_precision": "precision"}``; only needed when the handler that produced them
            cannot be found on the engine.
        name: name of the logger.
    """

    def __init__(
        self,
        output_dir: str,
        region_names: Sequence[str],
        metric_names: Sequence[str] | str | None = None,
        case_key: str = "case",
        csv_name: str = "metrics_per_case.csv",
        summary_name: str = "metrics_summary.json",
        confusion_metric_names: Mapping[str, str] | None = None,
        name: str = "SegmentationReport",
    ) -> None:
        self.output_dir = str(output_dir)
        self.region_names = [str(r) for r in ensure_tuple(region_names)]
        if not self.region_names:
            raise ValueError("SegmentationReport needs at least one region name.")
        self.metric_names = None if metric_names is None else [str(m) for m in ensure_tuple(metric_names)]
        self.case_key = case_key
        self.csv_name = csv_name
        self.summary_name = summary_name
        self.confusion_metric_names = dict(confusion_metric_names or {})
        self.logger = logging.getLogger(name)
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (epoch start, iteration completed, epoch completed)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_cases)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, _engine: Engine) -> None:
        self._cases = []

    def _collect_cases(self, engine: Engine) -> None:
        for item in _as_items(engine.state.batch):
            case = _case_id(item, self.case_key)
            self._cases.append(case if case is not None else f"case_{len(self._cases)}")

    def __call__(self, engine: Engine) -> None:
        """Write the CSV and the JSON summary and log the table (rank 0 only)."""
        cases = string_list_all_gather(self._cases) if idist.get_world_size() > 1 else list(self._cases)
        if idist.get_rank() != 0:
            return
        values = self._per_case_values(engine)
        if not values:
            self.logger.warning(
                "SegmentationReport: no metric details to report; attach metric handlers with save_details=True."
            )
            return
        num_cases = next(iter(values.values())).shape[0]
        if any(array.shape[0] != num_cases for array in values.values()):
            sizes = {metric: array.shape[0] for metric, array in values.items()}
            raise ValueError(f"SegmentationReport: metrics disagree on the number of cases: {sizes}.")
        if len(cases) != num_cases:
            self.logger.warning(
                f"SegmentationReport: {len(cases)} case ids were collected for {num_cases} metric rows; "
                "rows are named by index."
            )
            cases = [f"case_{i}" for i in range(num_cases)]

        summary: dict[str, dict[str, dict[str, float | None]]] = {}
        for metric, array in values.items():
            summary[metric] = {}
            for r, region in enumerate(self.region_names):
                column = array[:, r].astype(np.float64)
                not_nan = column[~np.isnan(column)]
                mean = float(np.mean(not_nan)) if not_nan.size else math.nan
                std = float(np.std(not_nan)) if not_nan.size else math.nan
                summary[metric][region] = {"mean": _finite_or_none(mean), "std": _finite_or_none(std)}

        self._write_csv(cases, values)
        report = {"num_cases": int(num_cases), "metrics": summary}
        _write_atomic(
            os.path.join(self.output_dir, self.summary_name),
            (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"),
        )
        self.logger.info(self._table(num_cases, summary))

    def _per_case_values(self, engine: Engine) -> dict[str, np.ndarray]:
        """``{metric: (num_cases, R) float array}`` from ``engine.state.metric_details``."""
        details = getattr(engine.state, "metric_details", None) or {}
        names = list(details) if self.metric_names is None else self.metric_names
        values: dict[str, np.ndarray] = {}
        for metric in names:
            if metric not in details or details[metric] is None:
                self.logger.warning(
                    f"SegmentationReport: no per-case details for metric '{metric}'; "
                    "is it attached with save_details=True?"
                )
                continue
            data = details[metric]
            if isinstance(data, (list, tuple)):  # metrics with several buffers: the first holds the values
                data = data[0]
            data = torch.as_tensor(data).detach().cpu().float()
            if data.ndim == 3 and data.shape[-1] == 4:  # raw TP/FP/TN/FN of a ConfusionMatrix handler
                data = compute_confusion_matrix_metric(self._confusion_name(engine, metric), data)
            if data.ndim == 1:
                data = data[:, None]
            if data.ndim != 2 or data.shape[1] != len(self.region_names):
                raise ValueError(
                    f"SegmentationReport: details of metric '{metric}' have shape {tuple(data.shape)}, expected "
                    f"(num_cases, {len(self.region_names)}) for regions {self.region_names}; check region_names "
                    "and that the metric uses include_background=True."
                )
            values[metric] = data.numpy()
        return values

    def _confusion_name(self, engine: Engine, metric: str) -> str:
        """The confusion-matrix metric (e.g. ``"precision"``) of the ``ConfusionMatrix`` handler named ``metric``."""
        if metric in self.confusion_metric_names:
            return self.confusion_metric_names[metric]
        for handler, args, _ in getattr(engine, "_event_handlers", {}).get(Events.EPOCH_COMPLETED, []):
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, ConfusionMatrix) and metric in args:
                return str(ensure_tuple(owner.metric_name)[0])
        raise ValueError(
            f"SegmentationReport: details of metric '{metric}' are confusion matrices but no ConfusionMatrix "
            f"handler named '{metric}' is attached; pass confusion_metric_names={{'{metric}': 'precision'}} "
            "(or the metric it computes)."
        )

    def _write_csv(self, cases: list[str], values: dict[str, np.ndarray]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case"] + [f"{m}_{r}" for m in values for r in self.region_names])
        for i, case in enumerate(cases):
            writer.writerow([case] + [str(values[m][i, r]) for m in values for r in range(len(self.region_names))])
        _write_atomic(os.path.join(self.output_dir, self.csv_name), buffer.getvalue().encode("utf-8"))

    def _table(self, num_cases: int, summary: dict) -> str:
        def cell(stats: dict) -> str:
            mean, std = stats["mean"], stats["std"]
            return "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"

        rows = [["metric"] + self.region_names]
        rows += [[metric] + [cell(summary[metric][r]) for r in self.region_names] for metric in summary]
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in rows]
        return f"Segmentation metrics over {num_cases} cases (mean ± std):\n" + "\n".join(lines)


class OverlayFigure:
    """Figure of a few cases: image | ground truth | prediction, on the slice with the most tumour.

    For each of the first ``num_cases`` cases of the epoch it keeps the axial slice (last spatial axis) where
    the ground truth's first region (whole tumour) is largest; only that slice is copied to the CPU, so the
    memory used stays small whatever the volume size. At the end of the epoch it draws one row per case and
    saves a PNG. Regions are painted in channel order with the SegAN paper's Fig. 3 colours (whole tumour
    yellow, core blue, enhancing red), so nested inner regions show on top of outer ones.

    It reads ``engine.state.output``: decollated dicts with ``image`` ``(C, H, W, D)``, ``label`` and ``pred``
    ``(R, H, W, D)`` binary region maps (2D items ``(C, H, W)`` are drawn whole). Slices are drawn transposed
    with the origin at the bottom, so the first array axis runs left to right. In a distributed run, rank 0
    draws the cases it evaluated.

    Args:
        output_dir: folder of the PNG (created if missing).
        region_names: names of the region channels, in channel order, used in the legend.
        num_cases: how many cases (rows) to draw.
        image_channel: which image channel to show in grey (-1: the last one, FLAIR in the bundle's order).
        filename: name of the PNG.
        colors: one matplotlib colour per region, in region order; default: Fig. 3 colours for three regions,
            matplotlib's default colour cycle otherwise.
        alpha: opacity of the region colours over the image.
        case_key: batch key holding the case id, else the image file name is used (see ``SegmentationReport``).
        dpi: resolution of the PNG.
        name: name of the logger.
    """

    def __init__(
        self,
        output_dir: str,
        region_names: Sequence[str],
        num_cases: int = 4,
        image_channel: int = -1,
        filename: str = "overlay.png",
        colors: Sequence[Any] | None = None,
        alpha: float = 0.6,
        case_key: str = "case",
        dpi: int = 100,
        name: str = "OverlayFigure",
    ) -> None:
        self.output_dir = str(output_dir)
        self.region_names = [str(r) for r in ensure_tuple(region_names)]
        if num_cases < 1:
            raise ValueError(f"num_cases must be >= 1, got {num_cases}.")
        self.num_cases = int(num_cases)
        self.image_channel = int(image_channel)
        self.filename = filename
        if colors is not None and len(colors) < len(self.region_names):
            raise ValueError(
                f"OverlayFigure got {len(colors)} colours for {len(self.region_names)} regions {self.region_names}."
            )
        self.colors = None if colors is None else list(colors)
        self.alpha = float(alpha)
        self.case_key = case_key
        self.dpi = int(dpi)
        self.logger = logging.getLogger(name)
        self._rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (epoch start, iteration completed, epoch completed)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, _engine: Engine) -> None:
        self._rows = []

    def _collect(self, engine: Engine) -> None:
        if len(self._rows) >= self.num_cases or idist.get_rank() != 0:
            return
        outputs = _as_items(engine.state.output)
        batch = _as_items(engine.state.batch)
        for i, item in enumerate(outputs):
            if len(self._rows) >= self.num_cases:
                break
            case = _case_id(batch[i], self.case_key) if i < len(batch) else None
            case = case or _case_id(item, self.case_key) or f"case_{len(self._rows)}"
            self._rows.append(self._take_slice(item, case))

    def _take_slice(self, item: Mapping, case: str) -> dict[str, Any]:
        for key in ("image", "pred"):
            if key not in item:
                raise KeyError(f"OverlayFigure needs '{key}' in engine.state.output items, got keys {list(item)}.")
        image, pred = torch.as_tensor(item["image"]), torch.as_tensor(item["pred"])
        label = torch.as_tensor(item["label"]) if item.get("label") is not None else None
        if pred.ndim not in (3, 4) or pred.shape[0] != len(self.region_names):
            raise ValueError(
                f"OverlayFigure expects pred of shape ({len(self.region_names)}, H, W[, D]) for regions "
                f"{self.region_names}, got {tuple(pred.shape)} (case {case})."
            )
        index = None
        if pred.ndim == 4:
            reference = label if label is not None and label[0].any() else pred
            area = reference[0].reshape(-1, reference.shape[-1]).float().sum(0)
            index = int(area.argmax()) if area.max() > 0 else reference.shape[-1] // 2

        def take(x: torch.Tensor) -> np.ndarray:
            x = x[..., index] if index is not None else x
            return x.detach().cpu().float().numpy()

        return {
            "case": case,
            "slice": index,
            "image": take(image[self.image_channel]),
            "label": None if label is None else take(label) > 0.5,
            "pred": take(pred) > 0.5,
        }

    def __call__(self, engine: Engine) -> None:
        """Draw the collected cases and save the PNG (rank 0 only)."""
        if idist.get_rank() != 0:
            return
        if not self._rows:
            self.logger.warning("OverlayFigure: no cases were collected, no figure written.")
            return
        path = os.path.join(self.output_dir, self.filename)
        _write_atomic(path, self._draw())
        self.logger.info(f"OverlayFigure: saved {len(self._rows)} cases to {path}.")

    def _region_colors(self) -> list[tuple[float, float, float]]:
        to_rgb, _ = optional_import("matplotlib.colors", name="to_rgb")
        colors = self.colors
        if colors is None:
            if len(self.region_names) == len(FIG3_COLORS):
                colors = list(FIG3_COLORS)
            else:
                rc_params, _ = optional_import("matplotlib", name="rcParams")
                cycle = rc_params["axes.prop_cycle"].by_key()["color"]
                colors = [cycle[i % len(cycle)] for i in range(len(self.region_names))]
        return [tuple(to_rgb(c)) for c in colors]

    @staticmethod
    def _grey(image: np.ndarray) -> np.ndarray:
        low, high = np.percentile(image, (0.5, 99.5)) if image.size else (0.0, 0.0)
        scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
        return np.repeat(np.clip(scaled, 0.0, 1.0)[..., None], 3, axis=-1)

    def _paint(self, grey: np.ndarray, regions: np.ndarray, colors: list) -> np.ndarray:
        rgb = grey.copy()
        for mask, color in zip(regions, colors):  # later (inner) regions paint over earlier (outer) ones
            rgb[mask] = (1.0 - self.alpha) * grey[mask] + self.alpha * np.asarray(color)
        return rgb

    def _draw(self) -> bytes:
        # the object-oriented API on an Agg canvas: no pyplot state and no global backend switch
        figure_cls, _ = optional_import("matplotlib.figure", name="Figure")
        canvas_cls, _ = optional_import("matplotlib.backends.backend_agg", name="FigureCanvasAgg")
        patch_cls, _ = optional_import("matplotlib.patches", name="Patch")
        colors = self._region_colors()
        rows = len(self._rows)
        fig = figure_cls(figsize=(7.5, 2.5 * rows + 0.4), layout="constrained")
        canvas_cls(fig)
        axes = fig.subplots(rows, 3, squeeze=False)
        for row, data in zip(axes, self._rows):
            grey = self._grey(data["image"])
            label = grey if data["label"] is None else self._paint(grey, data["label"], colors)
            where = "" if data["slice"] is None else f" (slice {data['slice']})"
            pred = self._paint(grey, data["pred"], colors)
            panels = [(grey, f"{data['case']}{where}"), (label, "ground truth"), (pred, "prediction")]
            for ax, (rgb, title) in zip(row, panels):
                ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        handles = [patch_cls(color=c, label=n) for n, c in zip(self.region_names, colors)]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()


class ValidationHistory:
    """Keep every validation's metrics in one JSON file: ``{"best": {...}, "history": [{...}, ...]}``.

    Attached to the validation evaluator of a training run: after each validation it appends the trainer's
    epoch and ``engine.state.metrics`` (e.g. the mean and per-region Dice) and records the best entry by
    the evaluator's key metric, then rewrites the file atomically. Rank 0 writes in distributed runs.
    With ``resume=True`` (a resumed training) the entries already in the file are kept.
    """

    def __init__(self, output_path: str, resume: bool = False, name: str = "ValidationHistory") -> None:
        self.output_path = output_path
        self.history: list[dict] = []
        self.logger = logging.getLogger(name)
        if resume and os.path.isfile(output_path):
            with open(output_path) as f:
                self.history = list(json.load(f).get("history", []))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        entry = {"epoch": int(engine.state.epoch)}  # an evaluator run by ValidationHandler has the trainer's epoch
        entry.update({k: _scalar(v) for k, v in engine.state.metrics.items()})
        self.history = [h for h in self.history if h["epoch"] < entry["epoch"]] + [entry]
        key = getattr(engine.state, "key_metric_name", None)
        best = max(self.history, key=lambda h: -math.inf if h.get(key) is None else h[key]) if key else entry
        document = {"key_metric": key, "best": best, "history": self.history}
        _write_atomic(self.output_path, (json.dumps(document, indent=2) + "\n").encode())
        self.logger.info(f"validation metrics saved to {self.output_path}")


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return _finite_or_none(value)
    return value
