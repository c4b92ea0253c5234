"""Evaluation end to end: ``configs/evaluate.json`` scores whole cases in their own geometry with the paper's metrics.

Dice, precision and sensitivity per region (SegAN paper, Table 1), IoU (the ISIC 2017 SegAN re-implementation report),
the 95% Hausdorff distance as
the BraTS challenge computes it (mm), and the number of 3D connected components of prediction and ground truth
(Moeskops et al. 2017), per case in a CSV
and as mean ± std in a JSON summary, with a Fig. 3-style overlay PNG.

To know the right answer, two tests swap the segmentor for a 1x1 convolution that passes each (normalised) image
channel through as the logits of one region; the cases are written so that channel ``r`` is bright exactly where
the prediction of region ``r`` should be. Everything else (loading, modality selection, normalisation, crop/pad,
slicing, thresholding, inversion, metrics, report) is the real pipeline.
"""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT
from monai.bundle.scripts import run

from bundle.datalist import build_datalist
from bundle.demo import make_demo_dataset

# MONAI's own HausdorffDistanceMetric passes a deprecated argument to get_mask_edges; nothing to do with this bundle
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")

TRAIN = str(ROOT / "configs" / "train.json")
INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
REGIONS = ["whole_tumor", "tumor_core", "enhancing_tumor"]
METRICS = ["dice", "precision", "sensitivity", "iou", "hd95", "components_pred", "components_label", "outside_head"]
SHAPE = (36, 34, 24)
PASS_THROUGH = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 1}
# a rotated, anisotropic, shifted grid: predictions must come back on it
AFFINE = np.array([[0.0, -1.2, 0.0, 30.0], [0.9, 0.0, 0.0, -12.5], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


#: AFFINE's in-plane voxel size once reoriented to RAS (its second axis is R-L, its first A-P): the cases are at
#: the training spacing, so no in-plane resampling blurs the hand-made images these metrics are computed from
PIXDIM = [1.2, 0.9]


def _evaluate(config_file, root, output_dir, **overrides):
    run(
        config_file=config_file,
        bundle_root=str(root),
        output_dir=str(output_dir),
        **{"num_workers": 0, "sw_batch_size": 8, "pixdim": PIXDIM, **overrides},
    )


def _pass_through_root(tmp_path):
    """A bundle root whose model.pt makes the 1x1 convolution output ``100 * channel - 1`` per region."""
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    weights = {"weight": 100.0 * torch.eye(3).reshape(3, 3, 1, 1), "bias": -torch.ones(3)}
    torch.save(weights, root / "models" / "model.pt")
    return root


def _write_case(folder, case, label, predicted):
    """A BraTS 2018-2021 case: ``label`` as ``_seg``; t1c, t2, flair bright (12) where regions 0, 1, 2 are predicted.

    Every modality is 10 in a head box around the tumour and 0.05 outside it (so the normalisation's head mask,
    a log-intensity Otsu cut, is the box): after the normalisation over the head the
    bright voxels are positive and the rest of the head negative, so the pass-through logits ``100 x - 1`` are
    positive exactly on ``predicted[r]`` (and -1 on the zero background).
    """
    head = np.full(SHAPE, 0.05, np.float32)  # the air: a faint noise floor, far below the head in log intensity
    head[3:-3, 3:-3, 2:-2] = 10.0
    bright = [2.0 * p for p in predicted]
    channels = {"t1": head, "t1ce": head + bright[0], "t2": head + bright[1], "flair": head + bright[2]}
    (folder / case).mkdir(parents=True)
    for suffix, volume in {**channels, "seg": label}.items():
        image = nib.Nifti1Image(volume.astype(np.uint8 if suffix == "seg" else np.float32), AFFINE)
        nib.save(image, str(folder / case / f"{case}_{suffix}.nii.gz"))
    return {
        "image": [f"{case}/{case}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")],
        "label": f"{case}/{case}_seg.nii.gz",
        "case": case,
    }


def _regions(label):
    """Whole tumour {1, 2, 4}, core {1, 4}, enhancing {4} (BraTS 2018-2021)."""
    return [np.isin(label, [1, 2, 4]), np.isin(label, [1, 4]), label == 4]


def _read_report(output_dir):
    with open(Path(output_dir) / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((Path(output_dir) / "metrics_summary.json").read_text())
    return rows, summary


@pytest.mark.parametrize("spatial_fit", ["pad", "crop"])
def test_a_perfect_prediction_scores_one_and_zero_distance(tmp_path, spatial_fit):
    data = tmp_path / "data"
    items = []
    for index in range(2):
        label = np.zeros(SHAPE, np.uint8)
        label[10:22, 9:21, 6:16] = 2  # edema around a core of necrosis (1) in an enhancing shell (4)
        label[13:19, 12:18, 8:14] = 4
        label[15:17, 14:16, 10:12] = 1
        if index == 1:  # a second, separate lesion of edema only
            label[25:29, 24:28, 4:8] = 2
        items.append(_write_case(data, f"Case_{index}", label, _regions(label)))
    (tmp_path / "datalist.json").write_text(json.dumps({"validation": items}))

    out = tmp_path / "eval"
    _evaluate(
        [INFERENCE, EVALUATE],
        _pass_through_root(tmp_path),
        out,
        dataset_dir=str(data),
        data_list_file_path=str(tmp_path / "datalist.json"),
        network_def=PASS_THROUGH,
        spatial_fit=spatial_fit,
        crop_size=[32, 30, 20],
        patch_size=[28, 26],
        save_predictions=True,
    )
    rows, summary = _read_report(out)
    assert [row["case"] for row in rows] == ["Case_0", "Case_1"]
    assert summary["num_cases"] == 2
    expected = {"dice": 1.0, "precision": 1.0, "sensitivity": 1.0, "iou": 1.0, "hd95": 0.0}
    for metric, value in expected.items():
        for region in REGIONS:
            assert summary["metrics"][metric][region] == {"mean": pytest.approx(value), "std": pytest.approx(0.0)}
    # components: whole tumour 1 then 2 (the second lesion); core and enhancing 1 in both cases
    for source in ("pred", "label"):
        counts = [[float(row[f"components_{source}_{r}"]) for r in REGIONS] for row in rows]
        assert counts == [[1, 1, 1], [2, 1, 1]]
    # the saved label maps are the ground truth, on the input's grid
    for item in items:
        saved = nib.load(str(out / f"{item['case']}_seg.nii.gz"))
        truth = nib.load(str(data / item["label"]))
        np.testing.assert_allclose(saved.affine, AFFINE, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(saved.dataobj), np.asarray(truth.dataobj))


def test_a_known_prediction_gives_hand_computed_scores(tmp_path):
    data = tmp_path / "data"
    label = np.zeros(SHAPE, np.uint8)
    label[10:14, 10:14, 8:12] = 4  # a 4x4x4 enhancing cube: all three regions
    predicted = label > 0
    predicted[18:20, 11:13, 9:11] = True  # plus a false 2x2x2 island, 5 and 6 voxels beyond the cube's face
    item = _write_case(data, "Case_0", label, [predicted] * 3)
    (tmp_path / "datalist.json").write_text(json.dumps({"testing": [item]}))

    # as an overlay on the inference config this time, on a given section of a datalist
    out = tmp_path / "eval"
    _evaluate(
        [INFERENCE, EVALUATE],
        _pass_through_root(tmp_path),
        out,
        dataset_dir=str(data),
        data_list_file_path=str(tmp_path / "datalist.json"),
        data_list_key="testing",
        network_def=PASS_THROUGH,
    )
    rows, summary = _read_report(out)
    # 64 true voxels, 72 predicted, 64 in common
    dice, precision, sensitivity, iou = 2 * 64 / (72 + 64), 64 / 72, 1.0, 64 / 72
    # HD95 as BraTS computes it, in mm: surface voxels of both masks, pooled. The true cube's 56 surface voxels
    # (4^3 minus its 2^3 interior) and the predicted cube's 56 lie at 0; the island's 8 lie 5 and 6 voxels
    # beyond the cube's face along the first axis, whose voxels are 0.9 mm (AFFINE): four at 4.5, four at 5.4 mm.
    # The 95th percentile of those 120 distances, at 0.95 * 119 = 113.05 in sorted order, is 4.5 mm (MONAI's
    # HausdorffDistanceMetric, the larger directed percentile in voxels, would give 5.85).
    hd95 = 4.5
    for region in REGIONS:
        row = rows[0]
        assert float(row[f"dice_{region}"]) == pytest.approx(dice, abs=1e-6)
        assert float(row[f"precision_{region}"]) == pytest.approx(precision, abs=1e-6)
        assert float(row[f"sensitivity_{region}"]) == pytest.approx(sensitivity, abs=1e-6)
        assert float(row[f"iou_{region}"]) == pytest.approx(iou, abs=1e-6)
        assert float(row[f"hd95_{region}"]) == pytest.approx(hd95, abs=1e-4)
        assert float(row[f"components_pred_{region}"]) == 2
        assert float(row[f"components_label_{region}"]) == 1
        assert summary["metrics"]["dice"][region]["mean"] == pytest.approx(dice, abs=1e-6)


def test_evaluation_scores_the_validation_cases_of_the_training_split(tmp_path):
    data = tmp_path / "demo"
    make_demo_dataset(str(data), num_cases=4, shape=(40, 36, 24), seed=5)
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": [4, 8, 16, 32]})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")

    out = tmp_path / "eval"
    _evaluate([INFERENCE, EVALUATE], root, out, dataset_dir=str(data), features=[4, 8, 16, 32], overlay_cases=2)
    rows, summary = _read_report(out)
    validation = [item["case"] for item in build_datalist(str(data))["validation"]]
    assert [row["case"] for row in rows] == validation
    assert list(rows[0]) == ["case"] + [f"{m}_{r}" for m in METRICS for r in REGIONS]
    assert set(summary["metrics"]) == set(METRICS)
    for metric in METRICS:
        for region in REGIONS:
            stats = summary["metrics"][metric][region]
            assert set(stats) == {"mean", "std"}
            assert stats["mean"] is None or math.isfinite(stats["mean"])
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*_seg.nii.gz"))  # predictions are saved only when asked for


def test_evaluation_refuses_cases_without_labels(tmp_path):
    from bundle.datalist import evaluation_datalist

    (tmp_path / "list.json").write_text(json.dumps({"validation": [{"image": "a.nii.gz", "case": "a"}]}))
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="needs a ground-truth label for every case, but a have none"):
        evaluation_datalist(str(tmp_path / "list.json"), str(tmp_path))


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b)) if (a.any() or b.any()) else 1.0


def test_every_metric_scores_the_written_label_map_and_empty_regions_score_as_in_brats(tmp_path):
    """Regions predicted outside one another (core beyond the whole tumour) count as the label map says.

    The written label map paints whole tumour, then core, then enhancing, so a core voxel outside the predicted
    whole tumour is whole tumour in the map: the report must score the map's nested regions, which is what an
    external evaluation of the written files sees. Case_1 predicts no enhancing tumour where there is one
    (Dice 0, HD95 374 mm, BraTS 2023's scores) and Case_0 has none in either (Dice 1, HD95 0).
    """
    data = tmp_path / "data"
    items, truths = [], []
    for index in range(2):
        label = np.zeros(SHAPE, np.uint8)
        label[10:22, 9:21, 6:16] = 2
        label[13:19, 12:18, 8:14] = 1
        if index == 1:
            label[15:17, 14:16, 10:12] = 4
        whole = label > 0
        core = np.zeros(SHAPE, bool)
        core[13:19, 12:18, 8:14] = True
        core[26:29, 25:28, 4:7] = True  # predicted core outside the predicted whole tumour
        enhancing = np.zeros(SHAPE, bool)  # never predicted
        items.append(_write_case(data, f"Case_{index}", label, [whole, core, enhancing]))
        truths.append(_regions(label))
    (tmp_path / "datalist.json").write_text(json.dumps({"validation": items}))
    out = tmp_path / "eval"
    _evaluate(
        [INFERENCE, EVALUATE],
        _pass_through_root(tmp_path),
        out,
        dataset_dir=str(data),
        data_list_file_path=str(tmp_path / "datalist.json"),
        network_def=PASS_THROUGH,
        save_predictions=True,
    )
    rows, summary = _read_report(out)
    assert "BraTS" in summary["definitions"]["hd95"]
    for row, item, truth in zip(rows, items, truths):
        written = np.asarray(nib.load(str(out / f"{item['case']}_seg.nii.gz")).dataobj)
        regions = _regions(written)
        assert regions[0][26:29, 25:28, 4:7].all()  # the stray core is whole tumour in the written map
        for r, region in enumerate(REGIONS):
            assert float(row[f"dice_{region}"]) == pytest.approx(_dice(regions[r], truth[r]), abs=1e-6)
        assert float(row["dice_whole_tumor"]) < 1.0  # the stray core costs whole-tumour Dice
    assert float(rows[0]["dice_enhancing_tumor"]) == 1.0 and float(rows[0]["hd95_enhancing_tumor"]) == 0.0
    assert float(rows[1]["dice_enhancing_tumor"]) == 0.0 and float(rows[1]["hd95_enhancing_tumor"]) == 374.0
    assert summary["metrics"]["dice"]["enhancing_tumor"]["mean"] == pytest.approx(0.5)


LESION_COLUMNS = [
    "lesion_dice",
    "lesion_hd95",
    "lesion_dice_matched",
    "lesion_hd95_matched",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
]


def _official_brats_evaluator():
    """``panoptica`` set up as the official BraTS evaluation package's glioma config, for this bundle's label values."""
    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        MaxBipartiteMatching,
        Metric,
        Panoptica_Evaluator,
    )
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
    from panoptica.utils.label_group import LabelGroup, LabelMergeGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups

    groups = {"wt": LabelMergeGroup([1, 2, 4]), "tc": LabelMergeGroup([1, 4]), "et": LabelGroup([4])}
    zero_tp = {
        metric: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN, default_result=result)
        for metric, result in ((Metric.DSC, EdgeCaseResult.ZERO), (Metric.HD95, EdgeCaseResult.INF))
    }
    return Panoptica_Evaluator(
        edge_case_handler=EdgeCaseHandler(listmetric_zeroTP_handling=zero_tp),
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        instance_metrics=[Metric.DSC, Metric.HD95],
        global_metrics=[Metric.DSC, Metric.HD95],
        segmentation_class_groups=SegmentationClassGroups(groups),
    )


@pytest.mark.slow
def test_lesion_wise_report_equals_the_official_evaluation_of_the_written_label_maps(tmp_path):
    """``--lesion_wise true`` adds BraTS's lesion-wise scores, and every per-case number equals what ``panoptica``
    (the official BraTS evaluation) computes from the NIfTI files the bundle wrote and the reference files.

    Case_0 has two whole-tumour lesions, of which the prediction finds one and adds a spurious one; Case_1 is
    predicted exactly. Lesion-wise whole-tumour Dice of Case_0 is the found lesion's Dice over 3 lesions.
    """
    pytest.importorskip("panoptica", reason="lesion-wise metrics need the optional 'lesionwise' extra")
    data = tmp_path / "data"
    items = []
    for index in range(2):
        label = np.zeros(SHAPE, np.uint8)
        label[8:20, 8:20, 5:15] = 2
        label[11:17, 11:17, 7:13] = 1
        label[13:15, 13:15, 9:11] = 4
        predicted = _regions(label)
        if index == 0:
            label[24:28, 24:29, 14:19] = 2  # a second, small lesion, missed
            predicted[0] = predicted[0].copy()
            predicted[0][9:21, 8:19, 5:15] = True  # the large lesion, a little off
            predicted[0][24:27, 6:9, 4:7] = True  # a spurious lesion
        items.append(_write_case(data, f"Case_{index}", label, predicted))
    (tmp_path / "datalist.json").write_text(json.dumps({"validation": items}))
    out = tmp_path / "eval"
    _evaluate(
        [INFERENCE, EVALUATE],
        _pass_through_root(tmp_path),
        out,
        dataset_dir=str(data),
        data_list_file_path=str(tmp_path / "datalist.json"),
        network_def=PASS_THROUGH,
        save_predictions=True,
        lesion_wise=True,
    )
    rows, summary = _read_report(out)
    assert list(rows[0]) == ["case"] + [f"{m}_{r}" for m in METRICS + LESION_COLUMNS for r in REGIONS]
    assert "panoptica" in summary["definitions"]["lesion"]

    from panoptica import Metric

    official = _official_brats_evaluator()
    for row, item in zip(rows, items):
        written, reference = out / f"{item['case']}_seg.nii.gz", data / item["label"]
        results = official.evaluate(str(written), str(reference))
        # panoptica 2.1.7 computes the global HD95 on the voxel grid; its per-lesion HD95 and the challenge's
        # definition use the voxel size, so the global one is checked with panoptica's metric given the spacing
        spacing = nib.load(str(reference)).header.get_zooms()
        regions = zip(
            _regions(np.asarray(nib.load(str(written)).dataobj)), _regions(np.asarray(nib.load(str(reference)).dataobj))
        )
        for region, group, (pred, truth) in zip(REGIONS, ["wt", "tc", "et"], regions):
            result = results[group]
            assert float(row[f"dice_{region}"]) == pytest.approx(result.global_bin_dsc, abs=1e-4)
            hd95 = Metric.HD95(truth.astype(np.uint8), pred.astype(np.uint8), voxelspacing=spacing)
            assert float(row[f"hd95_{region}"]) == pytest.approx(hd95, abs=1e-4)
            counts = [int(float(row[f"lesion_{c}_{region}"])) for c in ("tp", "fp", "fn")]
            assert counts == [result.tp, result.fp, result.fn]
            assert float(row[f"lesion_dice_matched_{region}"]) == pytest.approx(result.sq_dsc, abs=1e-4)
            assert float(row[f"lesion_hd95_matched_{region}"]) == pytest.approx(result.sq_hd95, abs=1e-4)
    case_0 = rows[0]
    assert [case_0[f"lesion_{c}_whole_tumor"] for c in ("tp", "fp", "fn")] == ["1.0", "1.0", "1.0"]
    assert float(case_0["lesion_dice_whole_tumor"]) == pytest.approx(
        float(case_0["lesion_dice_matched_whole_tumor"]) / 3
    )
    assert float(case_0["lesion_dice_whole_tumor"]) < float(case_0["dice_whole_tumor"]) - 0.4
    assert float(rows[1]["lesion_dice_whole_tumor"]) == 1.0 and float(rows[1]["lesion_hd95_whole_tumor"]) == 0.0


def test_overlay_cases_zero_writes_the_metrics_and_no_figure(tmp_path):
    data = tmp_path / "data"
    label = np.zeros(SHAPE, np.uint8)
    label[10:22, 9:21, 6:16] = 2
    item = _write_case(data, "Case_0", label, _regions(label))
    (tmp_path / "datalist.json").write_text(json.dumps({"validation": [item]}))
    out = tmp_path / "eval"
    _evaluate(
        [INFERENCE, EVALUATE],
        _pass_through_root(tmp_path),
        out,
        dataset_dir=str(data),
        data_list_file_path=str(tmp_path / "datalist.json"),
        network_def=PASS_THROUGH,
        overlay_cases=0,
    )
    assert (out / "metrics_per_case.csv").is_file() and not (out / "overlay.png").exists()
