"""End to end through ``monai.bundle``: the training config trains, validates and saves what users expect."""

import json
import os

import pytest
import torch
from helpers import ROOT, TINY
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

pytestmark = pytest.mark.slow  # every test trains (or starts a training) through monai.bundle run

TRAIN = os.path.join(ROOT, "configs", "train.json")


def _train(root, dataset_dir, **overrides):
    run("training", config_file=TRAIN, bundle_root=str(root), dataset_dir=str(dataset_dir), **{**TINY, **overrides})


def test_training_writes_flat_segmentor_weights_metrics_and_training_state(tmp_path, demo_dir):
    _train(tmp_path, demo_dir)
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    assert all(isinstance(v, torch.Tensor) for v in weights.values())  # a flat state dict, no "model" key
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": TINY["features"], "bundle_root": str(tmp_path)})
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

    # a run killed from outside leaves only the periodic state: resuming picks that up
    os.remove(tmp_path / "checkpoints" / "training_state.pt")
    assert "checkpoint_epoch=3.pt" in os.listdir(tmp_path / "checkpoints")
    _train(tmp_path, demo_dir, max_epochs=4, resume=True)
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3, 4]


def test_resume_without_a_saved_state_says_what_to_do(tmp_path, demo_dir):
    with pytest.raises(Exception) as error:
        _train(tmp_path, demo_dir, resume=True)
    assert "nothing to resume from" in repr(error.value) + repr(error.value.__cause__)


def _write_custom_dataset(root, demo_dir):
    """A non-BraTS dataset: one single-channel file per case, labels 1 and 2, and a datalist file."""
    import nibabel as nib
    import numpy as np

    items = []
    for case in sorted(c for c in os.listdir(demo_dir) if c.startswith("Demo_")):
        flair = nib.load(os.path.join(demo_dir, case, f"{case}_flair.nii.gz"))
        seg = np.asarray(nib.load(os.path.join(demo_dir, case, f"{case}_seg.nii.gz")).dataobj)
        tissue = np.select([seg == 2, seg > 0], [1, 2], 0).astype(np.uint8)  # 1 "edema", 2 "core"
        nib.save(nib.Nifti1Image(np.asarray(flair.dataobj), flair.affine), root / f"{case}_mri.nii.gz")
        nib.save(nib.Nifti1Image(tissue, flair.affine), root / f"{case}_tissue.nii.gz")
        items.append({"image": f"{case}_mri.nii.gz", "label": f"{case}_tissue.nii.gz"})
    datalist = {"training": items[:3], "validation": items[3:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root / "datalist.json"


def test_custom_one_channel_two_region_dataset_trains_through_overrides(tmp_path, demo_dir):
    data = tmp_path / "mine"
    data.mkdir()
    datalist = _write_custom_dataset(data, demo_dir)
    _train(
        tmp_path,
        str(data),
        data_list_file_path=str(datalist),
        image_modalities=["mri"],
        modalities=["mri"],
        regions={"edema": [1], "core": [2]},
        max_epochs=1,
    )
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    first = next(v for k, v in weights.items() if k.endswith("conv.weight"))
    assert first.shape[1] == 1
    last = [v for k, v in weights.items() if k.endswith("conv.weight")][-1]
    assert last.shape[0] == 2
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert {"val_dice_edema", "val_dice_core"} <= set(history["best"])


@pytest.mark.parametrize("region_labels", [None, [5, 7]])
def test_custom_regions_train_infer_and_evaluate_through_the_same_overrides(tmp_path, demo_dir, region_labels):
    """The README's "Your own data": one MRI channel, two regions. The label map is written with region i as
    value i + 1 (or the ``region_labels`` training was given), and evaluation reads the regions back from those
    values."""
    import nibabel as nib
    import numpy as np

    data = tmp_path / "mine"
    data.mkdir()
    datalist = _write_custom_dataset(data, demo_dir)
    mine = {
        "data_list_file_path": str(datalist),
        "image_modalities": ["mri"],
        "modalities": ["mri"],
        "regions": {"edema": [1], "core": [2]},
    }
    _train(tmp_path, str(data), max_epochs=1, **mine, **({"region_labels": region_labels} if region_labels else {}))
    inference = os.path.join(ROOT, "configs", "inference.json")
    # the same overrides as training; the label values come with the weights (models/model_recipe.json)
    settings = {
        "bundle_root": str(tmp_path),
        "dataset_dir": str(data),
        "features": TINY["features"],
        "num_workers": 0,
        "progress": False,
        **mine,
    }
    run(config_file=inference, output_dir=str(tmp_path / "pred"), data_list_key="validation", **settings)
    written = sorted((tmp_path / "pred").rglob("*.nii.gz"))
    assert len(written) == 1
    values = set(np.unique(np.asarray(nib.load(str(written[0])).dataobj)).tolist())
    assert values <= {0, *(region_labels or [1, 2])}
    run(
        config_file=[inference, os.path.join(ROOT, "configs", "evaluate.json")],
        output_dir=str(tmp_path / "scores"),
        **settings,
    )
    dice = json.loads((tmp_path / "scores" / "metrics_summary.json").read_text())["metrics"]["dice"]
    reference = np.asarray(nib.load(str(data / json.loads(datalist.read_text())["validation"][0]["label"])).dataobj)
    predicted = np.asarray(nib.load(str(written[0])).dataobj)
    for name, reference_value, written_value in zip(("edema", "core"), (1, 2), region_labels or (1, 2)):
        a, b = predicted == written_value, reference == reference_value
        assert dice[name]["mean"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-4)


def _write_brats2015(root, num_subjects=3):
    """Demo cases rewritten as BraTS 2013/2015 ITK MetaImage folders (VSD names, HGG grade folder)."""
    import itk
    import numpy as np

    from bundle.phantom import make_demo_case

    names = {"t1": "MR_T1", "t1c": "MR_T1c", "t2": "MR_T2", "flair": "MR_Flair"}
    for i in range(num_subjects):
        images, label = make_demo_case(shape=(40, 40, 24), seed=3, index=i)
        label = np.where(label == 1, 3, label)  # BRATS 2015 also has label 3, non-enhancing core
        subject = root / "HGG" / f"brats_tcia_pat{i:03d}_0001"
        arrays = {names[m]: a for m, a in images.items()}
        arrays["OT"] = label.astype(np.uint8)
        for j, (name, array) in enumerate(arrays.items()):
            prefix = "VSD.Brain_3more.XX.O" if name == "OT" else "VSD.Brain.XX.O"
            folder = subject / f"{prefix}.{name}.{1000 + 10 * i + j}"
            folder.mkdir(parents=True)
            # ITK arrays are (z, y, x): transpose so the axial axis stays last after loading
            itk.imwrite(
                itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0))), str(folder / f"{folder.name}.mha")
            )


def test_paper_pipeline_trains_from_a_brats2015_mha_folder(tmp_path):
    data = tmp_path / "BRATS2015_Training"
    _write_brats2015(data)
    _train(tmp_path, str(data), max_epochs=1)
    # the MetaImage cases load as 3 channels and 3 nested regions (label 3 joins whole tumour and core)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(data)})
    case = parser.get_parsed_content("validate#dataset")[0]
    assert case["image"].shape[0] == 3 and case["label"].shape[0] == 3
    whole, core, enhancing = case["label"].bool()
    assert enhancing.any() and bool((enhancing <= core).all()) and bool((core <= whole).all())
    # one of the three HGG subjects is held out (the 9:1 split keeps at least one), scored per region
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert len(parser.get_parsed_content("val_datalist")) == 1
    entry = history["history"][0]
    assert entry["epoch"] == 1
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert 0.0 <= entry[f"val_dice_{region}"] <= 1.0
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    parser.get_parsed_content("network_def").load_state_dict(weights)


def test_command_line_booleans_given_as_text_are_understood(tmp_path, demo_dir):
    # `--amp false --resume false` reach the config as strings; "false" must not read as true
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(
        {**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(demo_dir), "amp": "false", "resume": "false"}
    )
    assert parser.get_parsed_content("train#trainer").amp is False
    parser.update({"multiclass": "false"})
    assert list(parser.get_parsed_content("regions")) == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    # a resume would fail here: there is no training state in this fresh bundle root
    _train(tmp_path, demo_dir, max_epochs=1, resume="false", amp="false")
    assert (tmp_path / "models" / "model.pt").is_file()


def test_same_seed_gives_the_same_segmentor(tmp_path, demo_dir):
    for run_name in ("a", "b"):
        _train(tmp_path / run_name, demo_dir, max_epochs=2)
    first, second = (
        torch.load(tmp_path / name / "checkpoints" / "training_state.pt", weights_only=False)["network"]
        for name in "ab"
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_slices_smaller_than_the_patch_are_padded_up_to_it(tmp_path, demo_dir):
    # the demo cases are 40x40 in plane; a 48x48 patch needs padding, not a shape error in the network
    small = {"crop_size": [48, 48, 12], "patch_size": [48, 48]}
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, **small, "dataset_dir": str(demo_dir)})
    for sample in parser.get_parsed_content("train#dataset")[0]:
        assert tuple(sample["image"].shape) == (3, 48, 48) and tuple(sample["label"].shape) == (3, 48, 48)
        # the 40 voxels of the case sit in the middle, 4 voxels of zero padding on each side
        assert not sample["image"][:, :4].any() and not sample["image"][:, -4:].any()
    _train(tmp_path, demo_dir, max_epochs=1, **small)
    history = json.loads((tmp_path / "eval" / "validation_metrics.json").read_text())
    assert 0.0 <= history["best"]["val_mean_dice"] <= 1.0
