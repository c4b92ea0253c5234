"""The MONAI model zoo's unit-test form, run against this bundle.

The model zoo checks a bundle by writing a random BraTS-like dataset laid out as
``<dir>/training/HGG/sample_<s>/image_<s>_<mod>.nii.gz`` (``mod`` in t1, t1ce, t2, flair) with
``label_<s>_seg.nii.gz`` (values 0, 1, 2, 4), and then, for each workflow, building a
``monai.bundle.ConfigWorkflow``, calling ``initialize()``, asserting that ``check_properties()`` reports no
missing required property, and calling ``run()`` and ``finalize()``. Here:

* training (``workflow_type="train"``, ``configs/train.json``) on a temporary copy of the bundle, its
  ``bundle_root`` left to the config so that the copy's own folder is found and written to;
* inference (``workflow_type="infer"``, ``configs/inference.json``) with the weights of that training: one
  label map per case, on the input's grid;
* evaluation (``workflow_type="eval"``), composed both ways: the zoo's ``[train.json, evaluate.json]`` and
  ``[inference.json, evaluate.json]``, which must write the same per-case numbers;
* the multi-process training, ``[train.json, multi_gpu_train.json]`` under ``torchrun --nproc_per_node 2``
  on CPU (gloo), every rank running the same ConfigWorkflow steps. This file is its own torchrun worker
  (``python tests/test_zoo_workflow.py <overrides>``), as ``tests/ddp_worker.py`` is for test_multi_gpu.py.

Every run uses a tiny network and 32x32 slices (``helpers.TINY``), so the file takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS.parent) not in sys.path:  # also when run by torchrun as the worker script
    sys.path.insert(0, str(TESTS.parent))

from helpers import ROOT, TINY  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402

MODALITIES = ("t1", "t1ce", "t2", "flair")
SHAPE = (44, 40, 16)  # not a multiple of the network's 16: inference pads, and must crop back to this
NUM_CASES = 5  # the 9:1 per-grade split holds out one: 4 training cases, 1 validation
QUIET = {"num_workers": 0, "progress": False}

pytestmark = [
    pytest.mark.slow,  # every test trains or runs a workflow end to end
    # MONAI's own HausdorffDistanceMetric passes a deprecated argument to get_mask_edges; nothing to do with this bundle
    pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning"),
    # the zoo's metadata key name that MONAI renames on reading
    pytest.mark.filterwarnings("ignore:.*optional_packages_version.*"),
]


def write_zoo_dataset(folder: Path, num_cases: int = NUM_CASES, seed: int = 0) -> Path:
    """Random volumes in the zoo's layout; labels drawn from 0, 1, 2, 4."""
    rng = np.random.default_rng(seed)
    for s in range(num_cases):
        case = folder / "training" / "HGG" / f"sample_{s}"
        case.mkdir(parents=True)
        for mod in MODALITIES:
            image = nib.Nifti1Image(rng.random(SHAPE, dtype=np.float32), np.eye(4))
            nib.save(image, str(case / f"image_{s}_{mod}.nii.gz"))
        label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=SHAPE)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(case / f"label_{s}_seg.nii.gz"))
    return folder


def copy_bundle(destination: Path) -> Path:
    """The bundle's code and configs in a fresh folder (no weights), as the zoo tests a copied bundle."""
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("configs", "bundle"):
        shutil.copytree(ROOT / part, destination / part, ignore=ignore)
    return destination


def workflow(kind: str, root: Path, *config_names: str, **overrides) -> ConfigWorkflow:
    configs = root / "configs"
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=[str(configs / name) for name in config_names],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        **overrides,
    )


def digest(module: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    return write_zoo_dataset(tmp_path_factory.mktemp("zoo_data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zoo_data):
    """One training through ConfigWorkflow, as the zoo runs it; what the test checks is recorded on the way."""
    root = copy_bundle(tmp_path_factory.mktemp("zoo_bundle"))
    flow = workflow("train", root, "train.json", dataset_dir=str(zoo_data), **{**TINY, **QUIET})
    flow.initialize()
    record = {
        "missing": flow.check_properties(),
        "bundle_root": flow.bundle_root,
        "trainer": type(flow.trainer).__name__,
        "max_epochs": flow.max_epochs,
        "train_cases": sorted(item["case"] for item in flow.train_dataset_data),
        "val_cases": sorted(item["case"] for item in flow.val_dataset_data),
    }
    flow.run()
    flow.finalize()
    return root, record


def test_train_workflow_has_every_required_property_and_trains(trained):
    root, record = trained
    assert record["missing"] == []
    # bundle_root, not overridden, is the copy the configs were read from: every output lands in it
    assert Path(record["bundle_root"]) == root
    assert record["trainer"] == "SegANTrainer" and record["max_epochs"] == TINY["max_epochs"]
    # the zoo layout is one case per sample folder, split 4 : 1
    assert record["train_cases"] == ["sample_0", "sample_1", "sample_3", "sample_4"]
    assert record["val_cases"] == ["sample_2"]
    assert (root / "models" / "model.pt").is_file()
    history = json.loads((root / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == list(range(1, TINY["max_epochs"] + 1))
    split = json.loads((root / "models" / "datalist.json").read_text())
    assert [item["case"] for item in split["validation"]] == record["val_cases"]


def test_infer_workflow_writes_one_label_map_per_case_on_the_input_grid(trained, zoo_data, tmp_path):
    root, _ = trained
    out = tmp_path / "predictions"
    flow = workflow(
        "infer",
        root,
        "inference.json",
        dataset_dir=str(zoo_data),
        output_dir=str(out),
        ckpt_path=str(root / "models" / "model.pt"),
        **QUIET,
    )
    flow.initialize()
    assert flow.check_properties() == []
    flow.run()
    flow.finalize()

    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [f"sample_{s}_seg.nii.gz" for s in range(NUM_CASES)]
    for s in range(NUM_CASES):
        source = nib.load(str(zoo_data / "training" / "HGG" / f"sample_{s}" / f"image_{s}_flair.nii.gz"))
        prediction = nib.load(str(out / f"sample_{s}_seg.nii.gz"))
        assert prediction.shape == source.shape == SHAPE
        np.testing.assert_allclose(prediction.affine, source.affine)
        values = np.asarray(prediction.dataobj)
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2, 4}


@pytest.fixture(scope="module")
def evaluations(trained, zoo_data, tmp_path_factory):
    """The held-out case evaluated through both compositions, with only the paths overridden."""
    root, _ = trained
    written = {}
    for base in ("train.json", "inference.json"):
        out = tmp_path_factory.mktemp("evaluation")
        flow = workflow(
            "eval",
            root,
            base,
            "evaluate.json",
            dataset_dir=str(zoo_data),
            output_dir=str(out),
            ckpt_path=str(root / "models" / "model.pt"),
            **QUIET,
        )
        flow.initialize()
        written[base] = {"missing": flow.check_properties(), "key_metric": list(flow.key_metric), "out": out}
        flow.run()
        flow.finalize()
    return written


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_eval_workflow_composes_evaluate_on_either_base_and_writes_metrics(trained, evaluations, base):
    _, record = trained
    result = evaluations[base]
    assert result["missing"] == [] and result["key_metric"] == ["dice"]
    summary = json.loads((result["out"] / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 1  # only the held-out case: the training's split record is read beside model.pt
    dice = summary["metrics"]["dice"]
    assert set(dice) == {"whole_tumor", "tumor_core", "enhancing_tumor"}
    assert all(0.0 <= region["mean"] <= 1.0 for region in dice.values())
    rows = (result["out"] / "metrics_per_case.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == record["val_cases"]


def test_both_evaluation_compositions_give_the_same_per_case_numbers(evaluations):
    """The tiny network was trained with features the defaults lack: both read them from the recipe record."""
    tables = [
        (evaluations[base]["out"] / "metrics_per_case.csv").read_text() for base in ("train.json", "inference.json")
    ]
    assert tables[0] == tables[1]
    assert len(tables[0].splitlines()) == 2


def _torchrun_available() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_gloo_available()
        and importlib.util.find_spec("torch.distributed.run") is not None
    )


@pytest.mark.skipif(not _torchrun_available(), reason="torchrun (torch.distributed.run with gloo) is not available")
def test_multi_process_train_workflow_under_torchrun(tmp_path):
    # the zoo's 5 cases: 4 training, 2 per rank, and 1 validation case, which both ranks validate (fewer validation
    # cases than ranks are repeated so that no rank has none)
    data = write_zoo_dataset(tmp_path / "data", num_cases=5)
    root = copy_bundle(tmp_path / "bundle")
    overrides = {**TINY, **QUIET, "bundle_root": str(root), "dataset_dir": str(data)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(root),
        json.dumps(overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [json.loads((root / f"zoo_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["missing"] == [] for r in ranks)
    # each rank trained on its own half of the 4 training cases ...
    split = json.loads((root / "models" / "datalist.json").read_text())
    assert len(split["training"]) == 4 and len(split["validation"]) == 1
    assert len(ranks[0]["train_cases"]) == len(ranks[1]["train_cases"]) == 2
    assert sorted(ranks[0]["train_cases"] + ranks[1]["train_cases"]) == sorted(c["case"] for c in split["training"])
    # ... and the averaged gradients kept both copies of each network identical
    assert ranks[0]["segmentor"] == ranks[1]["segmentor"] and ranks[0]["critic"] == ranks[1]["critic"]
    assert (root / "models" / "model.pt").is_file()
    history = json.loads((root / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == list(range(1, TINY["max_epochs"] + 1))


def _torchrun_worker(root: str, overrides: str) -> None:
    """One rank: the zoo's steps on ``[train.json, multi_gpu_train.json]``, then what the rank saw and holds."""
    import torch.distributed as dist

    flow = workflow("train", Path(root), "train.json", "multi_gpu_train.json", **json.loads(overrides))
    flow.initialize()
    missing = flow.check_properties()
    flow.run()
    report = {
        "world_size": dist.get_world_size(),
        "missing": missing,
        "train_cases": sorted(item["case"] for item in flow.train_dataset_data),
        "segmentor": digest(flow.trainer.network),
        "critic": digest(flow.parser.get_parsed_content("critic")),
    }
    rank = dist.get_rank()
    flow.finalize()
    (Path(root) / f"zoo_rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _torchrun_worker(*sys.argv[1:3])
