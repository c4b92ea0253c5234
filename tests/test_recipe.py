"""A model's recipe travels with it: training records, beside models/model.pt, the settings the network is
trained for; inference and evaluation take their defaults from the record and refuse a contradicting override."""

import json

import pytest
from helpers import ROOT, TINY, messages
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.checkpoints import check_recipe, read_recipe, recipe_path, write_recipe

TRAIN = str(ROOT / "configs" / "train.json")
INFERENCE = str(ROOT / "configs" / "inference.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    """A bundle root after a tiny training with non-default settings, and its data."""
    root = tmp_path_factory.mktemp("bundle")
    data = demo_dir
    run(
        "training",
        config_file=TRAIN,
        bundle_root=str(root),
        dataset_dir=str(data),
        **{**TINY, "max_epochs": 1, "skip": "add", "modalities": ["t2", "flair"]},
    )
    return root, data


@pytest.mark.slow
def test_training_records_the_recipe_beside_the_weights(trained):
    root, _ = trained
    recipe = json.loads((root / "models" / "model_recipe.json").read_text())
    assert recipe["features"] == TINY["features"] and recipe["skip"] == "add"
    assert recipe["modalities"] == ["t2", "flair"] and recipe["context_slices"] == 0
    assert recipe["regions"]["enhancing_tumor"] == [4] and recipe["region_labels"] == [2, 1, 4]
    assert recipe["multiclass"] is False and recipe["normalization"] == "zscore"


@pytest.mark.slow
def test_inference_builds_the_recorded_network_with_no_override(trained, tmp_path):
    root, data = trained
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"bundle_root": str(root)})
    assert parser.get_parsed_content("features") == TINY["features"]
    assert parser.get_parsed_content("modalities") == ["t2", "flair"]
    run(
        config_file=INFERENCE,
        bundle_root=str(root),
        dataset_dir=str(data),
        output_dir=str(tmp_path / "out"),
        num_workers=0,
        progress=False,
    )
    assert len(list((tmp_path / "out").rglob("*_seg.nii.gz"))) == 4


@pytest.mark.slow
def test_an_override_that_contradicts_the_recipe_names_the_setting_and_both_values(trained, tmp_path):
    root, data = trained
    with pytest.raises(Exception) as error:
        run(
            config_file=INFERENCE,
            bundle_root=str(root),
            dataset_dir=str(data),
            output_dir=str(tmp_path / "out"),
            num_workers=0,
            progress=False,
            modalities=["t1c", "t2", "flair"],
        )
    text = str(error.value) + str(error.value.__cause__)
    assert (
        "`modalities` is ['t1c', 't2', 'flair'] in this run" in text
        and "trained with modalities ['t2', 'flair']" in text
    )


def test_recipe_helpers(tmp_path):
    ckpt = str(tmp_path / "model.pt")
    assert read_recipe(ckpt) == {} and recipe_path(ckpt) == str(tmp_path / "model_recipe.json")
    write_recipe(ckpt, {"features": (4, 8), "regions": {"a": [1]}})
    check_recipe(ckpt, read_recipe(ckpt), {"features": [4, 8], "regions": {"a": (1,)}, "skip": "cat"})
    with pytest.raises(ValueError, match=r"`features` is \[4, 16\] in this run.*features \[4, 8\]"):
        check_recipe(ckpt, read_recipe(ckpt), {"features": [4, 16]})
    with pytest.raises(ValueError, match="not among"):
        write_recipe(ckpt, {"learning_rate": 1.0})


def test_weights_of_other_widths_without_a_recipe_are_refused_naming_the_setting(tmp_path):
    """Weights with no recipe record are checked against the config before a non-strict loader could take a part."""
    import torch

    from bundle.checkpoints import checked_features
    from bundle.networks import SegANSegmentor

    ckpt = str(tmp_path / "model.pt")
    torch.save(SegANSegmentor(features=[4, 8, 16, 32]).state_dict(), ckpt)
    assert checked_features(ckpt, [4, 8, 16, 32], "cat", 3, 3) == [4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"\[4, 8, 16, 32\] features but the config gives \[64, 128, 256, 512\]"):
        checked_features(ckpt, [64, 128, 256, 512], "cat", 3, 3)


@pytest.mark.slow
def test_a_training_state_given_as_weights_is_named_with_what_to_use_instead(trained, tmp_path):
    root, data = trained
    state = root / "checkpoints" / "training_state.pt"
    assert state.is_file()
    with pytest.raises(Exception) as error:
        run(
            config_file=INFERENCE,
            bundle_root=str(root),
            dataset_dir=str(data),
            output_dir=str(tmp_path / "out"),
            ckpt_path=str(state),
            num_workers=0,
            progress=False,
        )
    text = messages(error.value)
    assert f"'{state}' is a training state" in text
    assert "models/model.pt" in text and "--resume true" in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _train_features(bundle_root, **overrides):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(bundle_root), **overrides})
    return parser.get_parsed_content("features"), parser.get_parsed_content("skip")


def test_a_training_from_scratch_never_takes_the_widths_of_an_old_model_but_fine_tuning_does(tmp_path):
    import torch

    from bundle.networks import SegANSegmentor

    old = tmp_path / "models" / "model.pt"
    old.parent.mkdir()
    torch.save(SegANSegmentor(features=[4, 8, 16, 32], skip="add").state_dict(), old)
    write_recipe(str(old), {"features": [4, 8, 16, 32], "skip": "add"})
    assert _train_features(tmp_path) == ([64, 128, 256, 512], "cat")  # from scratch: the config's network
    assert _train_features(tmp_path, resume=True) == ([4, 8, 16, 32], "add")  # the run's own weights
    assert _train_features(tmp_path / "elsewhere", init_ckpt=str(old)) == ([4, 8, 16, 32], "add")
    parser = ConfigParser()
    parser.read_config(TRAIN)
    handlers = parser.get("train#handlers")  # what MONAI Label's /train puts in front: its loader of the served model
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(old), "load_dict": {"model": "$@network"}})
    assert _train_features(tmp_path, **{"train#handlers": handlers}) == ([4, 8, 16, 32], "add")
    old.with_name("model_recipe.json").unlink()  # weights from before records: their tensors give the widths
    assert _train_features(tmp_path, resume=True) == ([4, 8, 16, 32], "add")
    with pytest.raises(Exception) as error:
        _train_features(tmp_path, init_ckpt=str(tmp_path / "missing.pt"))
    assert f"init_ckpt '{tmp_path / 'missing.pt'}' is not a file" in str(error.value.__cause__)


def test_monailabel_training_and_a_resumed_run_take_the_recipe_of_their_weights(tmp_path):
    """MONAI Label's /train and --resume pass no overrides: the served weights' recipe gives every setting of the
    network and its input (a brats2024 model fine-tunes on its four labels, a sagittal 2-modality model on its
    view); --init_ckpt still needs them passed, and a contradiction is refused."""
    import torch

    from bundle.networks import SegANSegmentor

    served = tmp_path / "models" / "model.pt"
    served.parent.mkdir()
    torch.save(SegANSegmentor(features=[4, 8, 16, 32], out_channels=4).state_dict(), served)
    recorded = {"modalities": ["t2", "flair"], "slice_axis": 0, "context_slices": 1, "normalization": "percentile"}
    write_recipe(str(served), {"features": [4, 8, 16, 32], "skip": "cat", "label_convention": "brats2024", **recorded})
    parser = ConfigParser()
    parser.read_config(TRAIN)
    handlers = parser.get("train#handlers")
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(served), "load_dict": {"model": "$@network"}})

    defaults = {"modalities": ["t1c", "t2", "flair"], "slice_axis": 2, "context_slices": 0, "normalization": "zscore"}

    def resolved(**overrides):
        parser = ConfigParser()
        parser.read_config(TRAIN)
        parser.update({"bundle_root": str(tmp_path), **overrides})
        settings = {key: parser.get_parsed_content(key) for key in recorded}
        return parser.get_parsed_content("label_convention"), parser.get_parsed_content("out_channels"), settings

    assert resolved() == ("brats", 3, defaults)  # from scratch: the config's
    assert resolved(**{"train#handlers": handlers}) == ("brats2024", 4, recorded)  # MONAI Label's /train
    assert resolved(resume=True) == ("brats2024", 4, recorded)
    assert resolved(init_ckpt=str(served)) == ("brats", 3, defaults)  # fine-tuning other weights: say which
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(tmp_path), "init_ckpt": str(served)})
    check = next(i for i, item in enumerate(parser.get("start_checks")) if "check_recipe" in str(item))
    with pytest.raises(Exception) as error:
        parser.get_parsed_content(f"start_checks#{check}")
    assert "`modalities` is ['t1c', 't2', 'flair'] in this run" in messages(error.value)  # the first differing


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights_and_keeps_their_recipe(trained, tmp_path):
    import torch

    root, data = trained
    init = root / "models" / "model.pt"
    common = dict(
        config_file=TRAIN,
        dataset_dir=str(data),
        init_ckpt=str(init),
        **{**{k: v for k, v in TINY.items() if k != "features"}, "max_epochs": 1},
    )
    with pytest.raises(Exception) as error:  # the weights were trained on t2 and flair: a run on 3 channels is refused
        run("training", bundle_root=str(tmp_path / "refused"), **common)
    assert "`modalities` is ['t1c', 't2', 'flair'] in this run" in messages(error.value)
    tuned = tmp_path / "tuned"
    run("training", bundle_root=str(tuned), modalities=["t2", "flair"], learning_rate=1e-12, **common)
    recipe = read_recipe(str(tuned / "models" / "model.pt"))
    assert recipe["features"] == TINY["features"] and recipe["skip"] == "add"  # no --features, no --skip
    before, after = torch.load(init, weights_only=True), torch.load(tuned / "models" / "model.pt", weights_only=True)
    # a learning rate of 1e-12 moves no weight by more than 1e-9: the loaded weights, not new random ones
    # (batch-norm statistics are updated by any training step; they are not weights)
    weights = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert weights and all(torch.allclose(before[k], after[k], rtol=0, atol=1e-9) for k in weights)
