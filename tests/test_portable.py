"""The bundle runs from any folder when it is not pip-installed (downloaded, unpacked, MONAI Label's copy)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT
from helpers import TINY as TINY_SETTINGS

pytestmark = pytest.mark.slow  # trains and infers through `python -m monai.bundle` subprocesses

# `python -m monai.bundle ...` with this project's editable install hidden and the working folder off sys.path
UNINSTALLED = """
import runpy, sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f) + getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", ".")]
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""
TINY = [arg for key, value in {**TINY_SETTINGS, "max_epochs": 1}.items() for arg in (f"--{key}", json.dumps(value))]


def _bundle(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-c", UNINSTALLED, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_unpacked_bundle_trains_and_infers_from_another_folder(tmp_path, demo_dir):
    bundle_root = tmp_path / "unpacked" / "segan"
    for part in ("bundle", "configs"):
        shutil.copytree(os.path.join(ROOT, part), bundle_root / part, ignore=shutil.ignore_patterns("__pycache__"))
    data = demo_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    common = ["--bundle_root", str(bundle_root), "--dataset_dir", str(data)]

    _bundle(
        "run", "training", "--config_file", str(bundle_root / "configs" / "train.json"), *common, *TINY, cwd=elsewhere
    )
    assert (bundle_root / "models" / "model.pt").is_file()

    _bundle(
        "run",
        "--config_file",
        str(bundle_root / "configs" / "inference.json"),
        *common,
        "--features",
        "[4,8,16,32]",
        "--progress",
        "false",
        cwd=elsewhere,
    )
    predictions = sorted(f for f in os.listdir(bundle_root / "eval") if f.endswith("_seg.nii.gz"))
    assert predictions == [f"Demo_00{i}_seg.nii.gz" for i in range(4)]
