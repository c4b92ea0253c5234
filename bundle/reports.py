"""Metric reports written as files: the per-case evaluation report, and the validation history of training.

- :class:`SegmentationReport` turns the per-case details of MONAI's metric handlers (``save_details=True``)
  into one CSV row per case and a JSON summary of mean and standard deviation per metric and region: the
  numbers of the SegAN paper's Table 1 (Dice, precision, sensitivity per region), plus IoU (the ISIC 2017 SegAN
  re-implementation report),
  HD95 and the connected-component count of Moeskops et al. 2017 (:mod:`bundle.metrics`). It
  belongs to the ``handlers`` of a ``monai.engines.SupervisedEvaluator`` that runs over whole 3D cases (the
  2D SegAN segmentor applied slice by slice and restacked, Xue et al. 2018, section 3).
- :class:`ValidationHistory` keeps every validation of a training run, and the best, in one JSON file that
  outlives a resumed run (MONAI's ``MetricLogger`` keeps its history in memory only).

Both are ignite handlers written like MONAI's (``attach(engine)``, ``__call__(engine)``, a ``logging``
logger). Files are written atomically (:func:`bundle.files.write_atomic`), so a crash or a second reader
never sees a half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import decollate_batch
from monai.metrics import compute_confusion_matrix_metric
from monai.utils import IgniteInfo, ensure_tuple, min_version, optional_import, string_list_all_gather

from .cases import case_id
from .files import write_atomic

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["SegmentationReport", "ValidationHistory", "as_items"]


def as_items(data: Any) -> list:
    """The per-case items of ``engine.state.batch`` / ``output``, whether the evaluator decollated them or not."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        return list(decollate_batch(data, detach=True))
    return list(data)


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
    TP/FP/TN/FN per case as details; they are turned into the metric named in ``confusion_metrics``
    (e.g. precision) per case here. In a distributed run the case ids of all ranks are gathered and rank 0 writes the files.

    Args:
        output_dir: folder of the two files (created if missing).
        region_names: names of the region channels, in channel order, e.g.
            ``["whole_tumor", "tumor_core", "enhancing_tumor"]``.
        metric_names: names of the metrics to report, as attached to the evaluator (``key_metric`` /
            ``additional_metrics`` keys); ``None`` reports every metric with saved details.
        case_key: batch key holding the case id; if absent it comes from the image's ``filename_or_obj``
            (:func:`bundle.cases.case_id`).
        csv_name: file name of the per-case CSV.
        summary_name: file name of the JSON summary.
        confusion_metrics: ``{metric name: confusion-matrix metric}`` for the metrics whose details hold raw
            confusion matrices (``ConfusionMatrix`` handlers), e.g. ``{"precision": "precision"}``: the
            handler's ``metric_name``, which its details do not record.
        definitions: ``{metric name: how it is computed}``, written to the summary as ``"definitions"`` so a
            reader knows e.g. which HD95 it is.
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
        confusion_metrics: Mapping[str, str] | None = None,
        definitions: Mapping[str, str] | None = None,
        name: str = "SegmentationReport",
    ) -> None:
        self.definitions = dict(definitions or {})
        self.output_dir = str(output_dir)
        self.region_names = [str(r) for r in ensure_tuple(region_names)]
        if not self.region_names:
            raise ValueError("SegmentationReport needs at least one region name.")
        self.metric_names = None if metric_names is None else [str(m) for m in ensure_tuple(metric_names)]
        self.case_key = case_key
        self.csv_name = csv_name
        self.summary_name = summary_name
        self.confusion_metrics = dict(confusion_metrics or {})
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
        for item in as_items(engine.state.batch):
            case = case_id(item, self.case_key)
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
        if self.definitions:
            report["definitions"] = self.definitions
        write_atomic(
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
                data = compute_confusion_matrix_metric(self._confusion_name(metric), data)
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

    def _confusion_name(self, metric: str) -> str:
        """The confusion-matrix metric (e.g. ``"precision"``) that the details of ``metric`` are turned into."""
        if metric in self.confusion_metrics:
            return self.confusion_metrics[metric]
        raise ValueError(
            f"SegmentationReport: details of metric '{metric}' are confusion matrices (a ConfusionMatrix handler); "
            f"say which metric they give with confusion_metrics={{'{metric}': 'precision'}} (its metric_name)."
        )

    def _write_csv(self, cases: list[str], values: dict[str, np.ndarray]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case"] + [f"{m}_{r}" for m in values for r in self.region_names])
        for i, case in enumerate(cases):
            writer.writerow([case] + [str(values[m][i, r]) for m in values for r in range(len(self.region_names))])
        write_atomic(os.path.join(self.output_dir, self.csv_name), buffer.getvalue().encode("utf-8"))

    def _table(self, num_cases: int, summary: dict) -> str:
        def cell(stats: dict) -> str:
            mean, std = stats["mean"], stats["std"]
            return "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"

        rows = [["metric"] + self.region_names]
        rows += [[metric] + [cell(summary[metric][r]) for r in self.region_names] for metric in summary]
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in rows]
        return f"Segmentation metrics over {num_cases} cases (mean ± std):\n" + "\n".join(lines)


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
        write_atomic(self.output_path, (json.dumps(document, indent=2) + "\n").encode())
        self.logger.info(f"validation metrics saved to {self.output_path}")


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return _finite_or_none(value)
    return value
