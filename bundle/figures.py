"""The overlay figure of an evaluation: image, ground truth and prediction of a few cases (SegAN paper, Fig. 3).

:class:`OverlayFigure` is an ignite handler written like MONAI's, for the ``handlers`` of a
``monai.engines.SupervisedEvaluator`` that runs over whole 3D cases. It paints binary region maps in region
order, so nested inner regions show on top of outer ones; ``monai.visualize.blend_images`` colours one label
map through a colour map instead, which cannot give each nested region its Fig. 3 colour.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, ensure_tuple, min_version, optional_import

from .cases import case_id
from .files import write_atomic
from .reports import as_items

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["OverlayFigure", "TrainingCurves", "FIG3_COLORS"]

#: Region colours of the SegAN paper's Fig. 3, in region order: whole tumour, tumour core, enhancing tumour.
FIG3_COLORS = ("yellow", "blue", "red")


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
        case_key: batch key holding the case id, else it comes from the image file name (:func:`bundle.cases.case_id`).
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
        outputs = as_items(engine.state.output)
        batch = as_items(engine.state.batch)
        for i, item in enumerate(outputs):
            if len(self._rows) >= self.num_cases:
                break
            case = case_id(batch[i], self.case_key) if i < len(batch) else None
            case = case or case_id(item, self.case_key) or f"case_{len(self._rows)}"
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
        write_atomic(path, self._draw())
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


class TrainingCurves:
    """At the end of training, a PNG of the loss curves and the validation Dice beside ``validation_metrics.json``.

    Attached to the trainer: it averages each scalar of ``engine.state.output`` named in ``loss_keys`` over every
    epoch (e.g. the segmentor's adversarial ``loss`` and the critics' ``critic_loss``), and when the run completes
    reads the validation history that :class:`bundle.reports.ValidationHistory` writes and
    draws two panels: losses per epoch, and every Dice of each validation (mean and per region). Rank 0 draws.

    Args:
        history_path: the ``validation_metrics.json`` of the run; the PNG goes beside it.
        loss_keys: scalars of the trainer's output to plot.
        filename: name of the PNG.
    """

    def __init__(
        self,
        history_path: str,
        loss_keys: Sequence[str] = ("loss", "critic_loss"),
        filename: str = "training_curves.png",
    ) -> None:
        self.history_path = str(history_path)
        self.loss_keys = [str(k) for k in ensure_tuple(loss_keys)]
        self.output_path = os.path.join(os.path.dirname(self.history_path), filename)
        self.epochs: dict[str, dict[int, list[float]]] = {k: {} for k in self.loss_keys}
        self.logger = logging.getLogger("TrainingCurves")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for key in self.loss_keys:
            values = [
                float(torch.as_tensor(i[key]).float().mean()) for i in items if isinstance(i, Mapping) and key in i
            ]
            if values:
                self.epochs[key].setdefault(int(engine.state.epoch), []).extend(values)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        history = []
        if os.path.isfile(self.history_path):
            import json

            with open(self.history_path) as f:
                history = json.load(f).get("history", [])
        write_atomic(self.output_path, self._draw(history))
        self.logger.info(f"training curves saved to {self.output_path}")

    def _draw(self, history: list[dict]) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (losses, dice) = plt.subplots(1, 2, figsize=(11, 4))
        for key, per_epoch in self.epochs.items():
            if per_epoch:
                epochs = sorted(per_epoch)
                losses.plot(epochs, [np.mean(per_epoch[e]) for e in epochs], marker=".", label=key)
        losses.set(xlabel="epoch", ylabel="mean over the epoch's iterations", title="training losses")
        metrics = sorted({k for h in history for k, v in h.items() if k != "epoch" and isinstance(v, (int, float))})
        for metric in metrics:
            points = [(h["epoch"], h[metric]) for h in history if isinstance(h.get(metric), (int, float))]
            dice.plot(*zip(*points), marker="o", label=metric)
        dice.set(xlabel="epoch", ylabel="Dice", title="validation", ylim=(0, 1))
        for axis in (losses, dice):
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return buffer.getvalue()
