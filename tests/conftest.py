"""Shared test setup: make the bundle importable from the repository root without an install, and the fixtures
several modules share.

End-to-end tests (a training through ``monai.bundle run`` or ``ConfigWorkflow``, a subprocess such as torchrun,
a server or a script, or anything over about a second) carry the ``slow`` marker: ``python -m pytest -q -m "not
slow" tests`` runs the fast unit tests, ``python -m pytest -q tests`` runs everything.
"""

import sys
from pathlib import Path

import pytest
from helpers import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The small demo dataset (4 cases of 40x40x24 voxels, seed 1) that tests read from and never change.

    A test that modifies cases copies them first; the session fails at teardown if any file here was added,
    removed or rewritten, since later tests (of any module) read the same folder.
    """
    from bundle.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(str(out), num_cases=4, shape=(40, 40, 24), seed=1)
    before = _listing(out)
    yield out
    assert _listing(out) == before, f"a test changed the shared demo dataset {out}; copy the cases it modifies"


@pytest.fixture(scope="session")
def post_treatment_dir(tmp_path_factory) -> Path:
    """A small demo dataset with the BraTS 2024 post-treatment labels (1 NETC, 2 SNFH, 3 ET, 4 RC, a resection
    cavity in every case), in the BraTS 2023+ layout: 4 cases of 40x40x24 voxels, seed 1. Read-only, as ``demo_dir``."""
    from bundle.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo2024") / "data"
    make_demo_dataset(str(out), num_cases=4, shape=(40, 40, 24), seed=1, label_convention="brats2024")
    before = _listing(out)
    yield out
    assert _listing(out) == before, f"a test changed the shared post-treatment dataset {out}; copy what it modifies"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """``train(dataset_dir, **overrides)``: the bundle root of a tiny segmentor (``helpers.TINY``, 1 epoch unless
    overridden) trained on ``dataset_dir`` through ``monai.bundle run``, trained once per distinct settings in the
    session and shared by every test that asks for the same ones. Tests read it (they may add files beside the
    weights, e.g. an ONNX export) and write their outputs elsewhere."""
    import json

    from helpers import TINY
    from monai.bundle.scripts import run

    trained = {}

    def train(dataset_dir, **overrides) -> Path:
        settings = {**TINY, "max_epochs": 1, **overrides}
        key = json.dumps({"dataset_dir": str(dataset_dir), **settings}, sort_keys=True)
        if key not in trained:
            root = tmp_path_factory.mktemp("tiny_bundle")
            config = str(ROOT / "configs" / "train.json")
            run("training", config_file=config, bundle_root=str(root), dataset_dir=str(dataset_dir), **settings)
            trained[key] = root
        return trained[key]

    return train


@pytest.fixture(scope="session")
def post_treatment_bundle(tiny_bundle, post_treatment_dir) -> Path:
    """A bundle root whose ``models/model.pt`` is a tiny segmentor trained 1 epoch on ``post_treatment_dir`` with
    ``--label_convention brats2024`` through ``monai.bundle run`` (its recipe records the convention)."""
    return tiny_bundle(post_treatment_dir, label_convention="brats2024")
