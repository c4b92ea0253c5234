"""Moeskops et al. 2017 through the bundle: mutually exclusive classes (the BraTS labels as classes) train,
infer (argmax -> label map in the input geometry) and validate per class, from the configs/moeskops overlays."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.demo import make_demo_dataset

CONFIGS = os.path.join(ROOT, "configs")
SHAPE = (40, 37, 24)  # 37 pads unevenly, so a misplaced inverse pad would show
CLASSES = ["background", "necrotic_core", "edema", "enhancing_tumor"]


def _configs(*names):
    return [os.path.join(CONFIGS, f"{n}.json") for n in names]


def _tiny_networks():
    return {"network_def#features": 4, "network_def#hidden": 8, "critic_def#features": 4, "critic_def#hidden": 8}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(str(out), num_cases=4, shape=SHAPE, seed=2)
    return str(out)


@pytest.mark.slow
def test_adversarial_fcn_trains_on_classes_and_infers_label_maps(tmp_path, demo_dir):
    overlays = ["moeskops/multiclass", "moeskops/fcn"]
    run(
        "training",
        config_file=_configs("train", *overlays, "moeskops/adversarial"),
        bundle_root=str(tmp_path),
        dataset_dir=demo_dir,
        **{**TINY, "max_epochs": 1, "patches_per_image": 2},
        **_tiny_networks(),
    )
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert {f"val_dice_{c}" for c in CLASSES} <= set(history["best"])
    state = torch.load(tmp_path / "checkpoints" / "training_state.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("classifier") for k in state["critic"])  # the discriminator trained alongside

    out = tmp_path / "out"
    run(
        config_file=_configs("inference", *overlays),
        bundle_root=str(tmp_path),
        dataset_dir=demo_dir,
        output_dir=str(out),
        num_workers=0,
        progress=False,
        **{"network_def#features": 4, "network_def#hidden": 8},
    )
    saved = nib.load(str(out / "Demo_000_seg.nii.gz"))
    assert saved.shape == SHAPE
    assert set(np.unique(np.asarray(saved.dataobj))) <= {0, 1, 2, 4}


class _TopHalfIsClass(torch.nn.Module):
    """Logits that pick class ``index`` in the top half of the (padded) network input, background below."""

    def __init__(self, index, classes):
        super().__init__()
        self.index, self.classes = index, classes
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        half = x.shape[2] // 2
        logits[:, self.index, :half] = 1.0
        logits[:, 0, half:] = 1.0
        return logits


@pytest.mark.parametrize("index, value", [(1, 1), (2, 2), (3, 4)])
def test_multiclass_inference_writes_each_class_as_its_label_in_the_input_geometry(tmp_path, demo_dir, index, value):
    parser = ConfigParser()
    parser.read_config(_configs("inference", "moeskops/multiclass", "moeskops/dilated"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "dataset_dir": demo_dir,
            "output_dir": str(tmp_path / "out"),
            "num_workers": 0,
            "handlers": [],
            "network_def": _TopHalfIsClass(index, 4),
        }
    )
    parser.get_parsed_content("evaluator").run()
    # the 40 rows are padded to 48 (4 before, 4 after): the network's top half is the input's first 20 rows
    expected = np.zeros(SHAPE, np.uint8)
    expected[:20] = value
    for case in ("Demo_000", "Demo_001"):
        saved = nib.load(str(tmp_path / "out" / f"{case}_seg.nii.gz"))
        source = nib.load(os.path.join(demo_dir, case, f"{case}_t1ce.nii.gz"))
        assert saved.shape == SHAPE
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(saved.dataobj), expected)


def test_classes_are_sampled_equally_often_as_training_slice_centres(demo_dir):
    """The paper balances its training patches per class (section 3.1); the rows do it with slice crops."""
    parser = ConfigParser()
    parser.read_config(_configs("train", "moeskops/multiclass", "moeskops/fcn"))
    parser.update({**TINY, "dataset_dir": demo_dir, "patch_size": [16, 16], "slices_per_volume": 64})
    dataset = parser.get_parsed_content("train#dataset")
    centres = [int(s["label"][:, 8, 8].argmax()) for i in range(len(dataset)) for s in dataset[i]]
    counts = np.bincount(centres, minlength=len(CLASSES))
    assert len(centres) >= 128 and counts.min() > 0.5 * len(centres) / len(CLASSES)
