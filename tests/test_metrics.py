"""Evaluation metrics and reports: what the SegAN bundle measures and writes (Xue et al. 2018, Table 1).

The paper reports Dice, precision and sensitivity per region (whole tumour, tumour core, enhancing
tumour); the ISIC re-implementation report adds IoU and Moeskops et al. 2017 the number of 3D connected components.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import ConfusionMatrix, HausdorffDistance, MeanDice, MeanIoUHandler, from_engine
from monai.transforms import AsDiscreted

from bundle.figures import OverlayFigure
from bundle.metrics import ComponentCount, ComponentCountMetric, count_components
from bundle.reports import SegmentationReport

REGIONS = ["whole_tumor", "tumor_core", "enhancing_tumor"]


def _blobs() -> np.ndarray:
    """A 3D mask with three separate blobs and two voxels touching only at a corner."""
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[0:2, 0:2, 0:2] = 1  # blob 1
    mask[5:7, 0:3, 0:1] = 1  # blob 2
    mask[0:1, 6:9, 6:9] = 1  # blob 3
    mask[8, 8, 8] = 1  # the corner-touching pair: one component in the 26-neighbourhood,
    mask[9, 9, 9] = 1  # two with faces only
    return mask


def test_count_components_counts_separate_blobs_in_3d():
    mask = _blobs()
    assert count_components(mask) == 4
    assert count_components(mask, connectivity=1) == 5
    assert count_components(torch.as_tensor(mask)) == 4
    assert count_components(np.zeros((4, 4, 4))) == 0


def test_count_components_in_2d_and_rejects_other_shapes():
    square = np.zeros((5, 5))
    square[0, 0] = square[1, 1] = 1
    assert count_components(square) == 1
    assert count_components(square, connectivity=1) == 2
    with pytest.raises(ValueError, match="2D or 3D"):
        count_components(np.zeros((1, 4, 4, 4)))


def test_component_count_metric_per_case_and_region():
    pred = torch.zeros(2, 2, 10, 10, 10)
    pred[0, 0] = torch.as_tensor(_blobs())
    pred[1, 0, 0:3, 0:3, 0:3] = 1
    label = torch.zeros_like(pred)
    label[:, 1, 4:6, 4:6, 4:6] = 1

    metric = ComponentCountMetric(source="pred")
    metric(y_pred=pred, y=label)
    assert metric.aggregate("none").tolist() == [[4.0, 0.0], [1.0, 0.0]]
    assert metric.aggregate("mean_batch").tolist() == [2.5, 0.0]
    assert metric.aggregate().item() == pytest.approx(5 / 4)

    reference = ComponentCountMetric(source="label", connectivity=1)
    reference(y_pred=list(pred), y=list(label))  # lists of channel-first tensors, as a decollated evaluator gives
    assert reference.aggregate("none").tolist() == [[0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="batch-first"):
        ComponentCountMetric()(y_pred=torch.zeros(2, 4, 4), y=None)


def test_component_count_handler_saves_details():
    masks = torch.zeros(2, 1, 6, 6, 6)
    masks[0, 0, 0, 0, 0] = masks[0, 0, 5, 5, 5] = 1
    masks[1, 0, 1:3, 1:3, 1:3] = 1
    engine = Engine(lambda e, batch: batch)
    handler = ComponentCount(output_transform=lambda out: (out, out))
    handler.attach(engine, "components")
    state = engine.run([masks], max_epochs=1)
    assert state.metrics["components"] == pytest.approx(1.5)
    assert state.metric_details["components"].tolist() == [[2.0], [1.0]]


def _case(name: str, pred_shift: bool) -> dict:
    """One synthetic case: image channels 0-2 are the prediction, channel 3 an intensity image."""
    label = torch.zeros(3, 8, 8, 4)
    label[0, 2:6, 2:6, 1:3] = 1  # whole tumour: 32 voxels
    label[1, 3:5, 3:5, 1:3] = 1  # core: 8 voxels
    label[2, 3, 3, 1:3] = 1  # enhancing: 2 voxels
    pred = label.clone()
    if pred_shift:
        pred[0, :, :, 2] = 0  # whole tumour: only the first 16 of the 32 voxels
        pred[2, 6, 6, 1:3] = 1  # enhancing: 2 extra voxels in a second island
    intensity = torch.rand(1, 8, 8, 4, generator=torch.Generator().manual_seed(0)) + 2 * label[:1]
    image = torch.cat([pred, intensity])
    meta = {"filename_or_obj": f"/data/{name}.nii.gz"}
    return {"image": MetaTensor(image, meta=meta), "label": MetaTensor(label, meta=dict(meta))}


class _PredictionFromImage(torch.nn.Module):
    """Stands in for the segmentor: its 'prediction' is the first three image channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]


def test_report_and_overlay_from_an_evaluator(tmp_path):
    data = [_case("case_a", pred_shift=False), _case("case_b", pred_shift=True)]
    metric_kwargs = {"include_background": True, "output_transform": from_engine(["pred", "label"])}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=_PredictionFromImage(),
        postprocessing=AsDiscreted(keys="pred", threshold=0.5),
        key_val_metric={"val_mean_dice": MeanDice(**metric_kwargs)},
        additional_metrics={
            "val_precision": ConfusionMatrix(metric_name="precision", **metric_kwargs),
            "val_sensitivity": ConfusionMatrix(metric_name="sensitivity", **metric_kwargs),
            "val_iou": MeanIoUHandler(**metric_kwargs),
            "val_hd95": HausdorffDistance(percentile=95, **metric_kwargs),
            "val_components": ComponentCount(output_transform=from_engine(["pred", "label"])),
        },
        val_handlers=[
            SegmentationReport(
                tmp_path, REGIONS, confusion_metrics={"val_precision": "precision", "val_sensitivity": "sensitivity"}
            ),
            OverlayFigure(tmp_path, REGIONS, num_cases=4),
        ],
    )
    evaluator.run()

    assert sorted(os.listdir(tmp_path)) == ["metrics_per_case.csv", "metrics_summary.json", "overlay.png"]

    with open(tmp_path / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = ["val_mean_dice", "val_precision", "val_sensitivity", "val_iou", "val_hd95", "val_components"]
    assert list(rows[0]) == ["case"] + [f"{m}_{r}" for m in metrics for r in REGIONS]
    assert [row["case"] for row in rows] == ["case_a", "case_b"]
    # case_b, whole tumour: TP 16, FP 0, FN 16; enhancing: TP 2, FP 2, FN 0
    assert float(rows[1]["val_mean_dice_whole_tumor"]) == pytest.approx(2 / 3)
    assert float(rows[1]["val_precision_enhancing_tumor"]) == pytest.approx(1 / 2)
    assert float(rows[1]["val_components_enhancing_tumor"]) == 2

    with open(tmp_path / "metrics_summary.json") as f:
        summary = json.load(f)
    assert summary["num_cases"] == 2
    expected = {  # mean over case_a (perfect) and case_b
        "val_mean_dice": [(1 + 2 / 3) / 2, 1.0, (1 + 2 / 3) / 2],
        "val_precision": [1.0, 1.0, (1 + 1 / 2) / 2],
        "val_sensitivity": [(1 + 1 / 2) / 2, 1.0, 1.0],
        "val_iou": [(1 + 1 / 2) / 2, 1.0, (1 + 1 / 2) / 2],
        "val_components": [1.0, 1.0, 1.5],
    }
    for metric, means in expected.items():
        for region, mean in zip(REGIONS, means):
            assert summary["metrics"][metric][region]["mean"] == pytest.approx(mean), (metric, region)
    assert summary["metrics"]["val_mean_dice"]["whole_tumor"]["std"] == pytest.approx(1 / 6)
    assert summary["metrics"]["val_hd95"]["tumor_core"] == {"mean": 0.0, "std": 0.0}

    png = (tmp_path / "overlay.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_report_is_nan_safe_and_names_cases_by_key(tmp_path):
    dice = torch.tensor([[0.5, math.nan], [1.0, math.nan], [math.nan, math.nan]])
    batches = [{"case": ["p1", "p2"]}, {"case": ["p3"]}]
    engine = Engine(lambda e, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _details(e):
        e.state.metric_details = {"dice": dice, "other": torch.zeros(3, 2)}

    SegmentationReport(tmp_path, ["wt", "et"], metric_names=["dice"], summary_name="s.json").attach(engine)
    engine.run(batches, max_epochs=1)

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary == {
        "num_cases": 3,
        "metrics": {"dice": {"wt": {"mean": 0.75, "std": 0.25}, "et": {"mean": None, "std": None}}},
    }
    with open(tmp_path / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "dice_wt", "dice_et"]
    assert [r[0] for r in rows[1:]] == ["p1", "p2", "p3"]
    assert sorted(os.listdir(tmp_path)) == ["metrics_per_case.csv", "s.json"]


def _figure_colours(tmp_path, region_names, **kwargs) -> set[tuple[int, int, int]]:
    """The RGB colours that fill large areas (not only the legend) of the overlay figure of one case whose
    nested regions are all predicted, painted opaque."""
    regions = torch.zeros(len(region_names), 24, 24, 3)
    for r in range(len(region_names)):  # nested squares, outer region first
        regions[r, 2 + 3 * r : 22 - 3 * r, 2 + 3 * r : 22 - 3 * r] = 1
    engine = Engine(lambda e, batch: [{"image": torch.zeros(1, 24, 24, 3), "label": regions, "pred": regions}])
    OverlayFigure(tmp_path, region_names, alpha=1.0, **kwargs).attach(engine)
    engine.run([{"case": ["c"]}], max_epochs=1)
    from matplotlib.image import imread

    rgb = np.round(imread(tmp_path / "overlay.png")[..., :3] * 255).astype(int).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    return {tuple(c) for c, n in zip(colours.tolist(), counts) if n > 1000}


def test_overlay_colors_follow_segan_fig3_and_can_be_overridden(tmp_path):
    colours = _figure_colours(tmp_path / "fig3", REGIONS)
    assert {(255, 255, 0), (0, 0, 255), (255, 0, 0)} <= colours  # whole tumour yellow, core blue, enhancing red
    custom = _figure_colours(tmp_path / "custom", ["lesion"], colors=["#00ff00"])
    assert (0, 255, 0) in custom and (255, 255, 0) not in custom
    with pytest.raises(ValueError, match="colours"):
        OverlayFigure(tmp_path, REGIONS, colors=["red"])


def test_report_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    engine = Engine(lambda e, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _details(e):
        e.state.metric_details = {"dice": torch.ones(1, 1)}

    SegmentationReport(tmp_path, ["wt"]).attach(engine)

    def _fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OSError, match="disk full"):
        engine.run([{"case": ["p1"]}], max_epochs=1)
    assert os.listdir(tmp_path) == []


def test_outside_head_counts_each_region_voxels_where_the_normalised_image_is_air():
    from bundle.metrics import OutsideHeadMetric, outside_head_output

    image = torch.ones(2, 6, 6, 4)
    image[:, :2] = 0  # rows 0-1: air in every channel
    image[0, 2, 0, 0] = 0  # one channel 0 inside the head is still head
    pred = torch.zeros(2, 6, 6, 4)
    pred[0, :3] = 1  # region 0: 2 air rows (48 voxels) + 1 head row
    pred[1, 4:] = 1  # region 1: head only
    preds, air = outside_head_output([{"pred": pred, "image": image}])
    metric = OutsideHeadMetric(reduction="none")
    metric(y_pred=torch.stack(preds), y=torch.stack(air))
    assert metric.aggregate().tolist() == [[48.0, 0.0]]
