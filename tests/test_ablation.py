"""The ablation runner trains rows on one split, evaluates them on held-out cases, reports, and resumes."""

import csv
import json

import pytest
from helpers import TINY, load_script


@pytest.fixture(scope="module")
def ablation():
    return load_script("ablation")


@pytest.mark.slow
def test_two_rows_one_seed_end_to_end_and_resume(ablation, tmp_path, capsys):
    tiny = {**TINY, "max_epochs": 1, "demo_num_cases": 5, "demo_test_cases": 2, "demo_shape": [32, 32, 24]}
    args = dict(rows=["S3-3C", "U-net"], seeds=1, out=str(tmp_path / "report"), work_dir=str(tmp_path / "runs"))
    ablation.ablation(**args, **tiny)
    assert "[2/2] U-net, seed 0" in capsys.readouterr().out

    report = tmp_path / "report"
    table = (report / "README.md").read_text()
    assert "| S3-3C | 1 |" in table and "| U-net | 1 |" in table and "HD95" in table
    with open(report / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["S3-3C", "U-net"]
    for r in rows:
        assert 0.0 <= float(r["dice_whole_tumor_mean"]) <= 1.0 and r["sensitivity_tumor_core_mean"] != ""
        assert int(r["parameters"]) > 0
    assert int(rows[0]["critic_parameters"]) > 0 and int(rows[1]["critic_parameters"]) == 0
    assert (report / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every run was evaluated on the same held-out cases, none of which it trained or selected on
    datalist = json.loads((tmp_path / "runs" / "demo" / "datalist.json").read_text())
    held_out = {item["case"] for item in datalist["testing"]}
    seen = {item["case"] for item in datalist["training"] + datalist["validation"]}
    assert len(held_out) == 2 and not held_out & seen
    for run in ("S3-3C", "U-net"):
        result = json.loads((tmp_path / "runs" / "demo" / run / "seed0" / "result.json").read_text())
        assert result["num_test_cases"] == 2

    # a second call reuses the finished runs
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")}
    ablation.ablation(**args, **tiny)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")} == stamps
    assert capsys.readouterr().out.count("already done") == 2


def test_unknown_rows_are_named(ablation, tmp_path):
    with pytest.raises(ValueError, match="unknown rows"):
        ablation.ablation(rows=["S9-9C"], out=str(tmp_path), work_dir=str(tmp_path))


@pytest.mark.slow
def test_moeskops_suite_reports_one_column_per_class(ablation, tmp_path):
    tiny = {
        **TINY,
        "max_epochs": 1,
        "demo_num_cases": 5,
        "demo_test_cases": 2,
        "demo_shape": [32, 32, 24],
        "network_def#features": 4,
        "discriminator_features": 4,
        "discriminator_hidden": 8,
    }
    ablation.ablation(
        rows=["Dilated + adversarial"],
        seeds=1,
        suite="moeskops",
        out=str(tmp_path / "report"),
        work_dir=str(tmp_path / "runs"),
        **tiny,
    )
    with open(tmp_path / "report" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    for name in ("background", "necrotic_core", "edema", "enhancing_tumor"):
        assert 0.0 <= float(row[f"dice_{name}_mean"]) <= 1.0 and row[f"components_pred_{name}_mean"] != ""
    assert int(row["critic_parameters"]) > 0  # the discriminator


@pytest.mark.slow
def test_isic_suite_trains_on_the_lesion_demo_and_evaluates_its_test_set(ablation, tmp_path):
    tiny = {
        "lesion_demo_images": [4, 1, 2],
        "image_size": [32, 32],
        "features": [4, 8, 16, 32],
        "critic_features": [4, 8, 16],
        "batch_size": 4,
        "max_epochs": 1,
        "val_interval": 1,
        "num_workers": 0,
    }
    ablation.ablation(
        rows=["SegAN"], seeds=1, suite="isic", out=str(tmp_path / "report"), work_dir=str(tmp_path / "runs"), **tiny
    )
    result = json.loads((tmp_path / "runs" / "isic" / "SegAN" / "seed0" / "result.json").read_text())
    assert result["num_test_cases"] == 2 and 0.0 <= result["metrics"]["dice"]["lesion"] <= 1.0
    assert "| SegAN | 1 |" in (tmp_path / "report" / "README.md").read_text()


def test_a_failing_run_is_reported_and_retried_not_recorded(ablation, tmp_path, capsys):
    ablation.register(ablation.Row("broken", overrides={"critic_mode": "no such mode"}))
    tiny = {**TINY, "max_epochs": 1, "demo_num_cases": 4, "demo_test_cases": 1, "demo_shape": [32, 32, 24]}
    with pytest.raises(RuntimeError, match="broken seed 0"):
        ablation.ablation(rows=["broken"], seeds=1, out=str(tmp_path / "report"), work_dir=str(tmp_path), **tiny)
    assert "FAILED" in capsys.readouterr().out
    assert not list(tmp_path.rglob("result.json"))
