"""End to end through ``monai.bundle``: the training config trains, validates and saves what users expect."""

import json
import os

import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.demo import make_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
TINY = {
    "features": [4, 8, 16, 32],
    "critic_features": [4, 8, 16],
    "crop_size": [32, 32, 12],
    "patch_size": [32, 32],
    "slices_per_volume": 4,
    "volumes_per_batch": 2,
    "val_batch_slices": 8,
    "num_workers": 0,
    "max_epochs": 2,
    "val_interval": 1,
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(str(out), num_cases=4, shape=(40, 40, 24), seed=1)
    return str(out)


def _train(root, dataset_dir, **overrides):
    run("training", config_file=TRAIN, bundle_root=str(root), dataset_dir=dataset_dir, **{**TINY, **overrides})


def test_training_writes_flat_segmentor_weights_metrics_and_training_state(tmp_path, demo_dir):
    _train(tmp_path, demo_dir)
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    assert all(isinstance(v, torch.Tensor) for v in weights.values())  # a flat state dict, no "model" key
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": TINY["features"]})
    parser.get_parsed_content("network_def").load_state_dict(weights)

    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2]
    assert {"val_mean_dice", "val_dice_whole_tumor", "val_dice_tumor_core", "val_dice_enhancing_tumor"} <= set(
        history["best"]
    )
    state = torch.load(tmp_path / "checkpoints" / "training_state.pt", map_location="cpu", weights_only=False)
    assert {"network", "critic", "optimizer", "critic_optimizer", "trainer"} <= set(state)
    assert not any(name.startswith("critic") for name in os.listdir(tmp_path / "models"))

    # resuming continues from the saved epoch instead of starting over, and keeps the history
    _train(tmp_path, demo_dir, max_epochs=3, resume=True)
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]


def test_custom_one_channel_two_region_dataset_trains_through_overrides(tmp_path, demo_dir):
    # the FLAIR channel alone, and two made-up regions from the demo's labels
    _train(
        tmp_path,
        demo_dir,
        modalities=["flair"],
        regions={"edema": [2], "core": [1, 4]},
        max_epochs=1,
    )
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    first = next(v for k, v in weights.items() if k.endswith("conv.weight"))
    assert first.shape[1] == 1
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert {"val_dice_edema", "val_dice_core"} <= set(history["best"])
