"""multi_gpu_train.json trains with DistributedDataParallel under torchrun (two CPU processes, gloo)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY

from bundle.demo import make_demo_dataset

pytestmark = pytest.mark.slow  # trains under torchrun: two ranks in subprocesses


def test_two_ranks_share_the_data_and_keep_identical_networks(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(str(data), num_cases=16, shape=(32, 32, 24), seed=3)
    root = tmp_path / "run"
    root.mkdir()
    overrides = {**TINY, "dataset_dir": str(data), "bundle_root": str(root)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun of this very interpreter, whatever is on PATH
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, os.path.join(ROOT, "tests", "ddp_worker.py")]
    result = subprocess.run([*command, json.dumps(overrides)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((root / "ddp_report.json").read_text())
    assert report["same"] == {"segmentor": True, "critic": True}  # gradients were averaged across the ranks
    assert report["cases_per_rank"] == [7, 7]  # the 14 training cases split between the two ranks, cached once
    assert (root / "models" / "model.pt").is_file()
    history = json.loads((root / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2]
