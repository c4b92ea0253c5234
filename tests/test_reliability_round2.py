"""Reliability, second round (docs/reliability.md): no silent wrong answers, never touch an input, every bad
override named. Each test repeats one probe that used to exit 0 with a wrong or empty result, or fail far from
its cause, and shows the check that now catches it, on tiny demo volumes.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, messages
from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from monai.transforms import EnsureChannelFirstd

from bundle.datalist import SPLIT_RECORD, build_datalist, evaluation_datalist, inference_datalist, record_split
from bundle.loading import LoadCaseImaged
from bundle.settings_check import check_settings
from bundle.transforms import LabelToRegionsd, SelectModalitiesd

TRAIN = str(ROOT / "configs" / "train.json")
INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
SMALL_NET = {"features": TINY["features"], "num_workers": 0, "progress": False}
MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS = {"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A models/model.pt of random tiny-segmentor weights."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(_network().state_dict(), root / "models" / "model.pt")
    return root / "models" / "model.pt"


def _network():
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"features": TINY["features"]})
    return parser.get_parsed_content("network_def")


def _case(demo_dir, case, to) -> Path:
    target = Path(to) / case
    shutil.copytree(Path(demo_dir) / case, target)
    return target


def _files(case: Path) -> dict:
    return {m: str(case / f"{case.name}_{m}.nii.gz") for m in (*MODALITIES, "seg")}


def _item(case: Path) -> dict:
    files = _files(case)
    return {"image": [files[m] for m in MODALITIES], "label": files["seg"], "case": case.name}


def _rewrite(path, array=None, affine=None):
    image = nib.load(str(path))
    array = np.asarray(image.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), str(path))


# labels that quietly match nothing ------------------------------------------------------------------------------


def test_a_float_label_map_within_rounding_of_integers_gives_the_integer_regions(tmp_path, demo_dir):
    case = _case(demo_dir, "Demo_000", tmp_path)
    seg = _files(case)["seg"]
    exact = LoadCaseImaged(["label"], image_only=True, ensure_channel_first=True)({"label": seg})
    _rewrite(seg, (np.asarray(nib.load(seg).dataobj).astype(np.float32) * np.float32(1.0000001)))
    drifted = LoadCaseImaged(["label"], image_only=True, ensure_channel_first=True)({"label": seg})
    assert not torch.equal(drifted["label"], exact["label"].float())  # the file does hold 4.0000005 etc.
    to_regions = LabelToRegionsd("label", BRATS)
    assert torch.equal(to_regions(drifted)["label"], to_regions(exact)["label"])
    assert to_regions(exact)["label"][0].any()


def test_a_label_map_that_is_not_integer_is_refused_naming_the_file_and_values(tmp_path, demo_dir):
    case = _case(demo_dir, "Demo_000", tmp_path)
    seg = _files(case)["seg"]
    _rewrite(seg, np.asarray(nib.load(seg).dataobj).astype(np.float32) * 0.5)  # as if linearly resampled
    loaded = LoadCaseImaged(["label"], image_only=True, ensure_channel_first=True)({"label": seg})
    with pytest.raises(ValueError, match=rf"{seg}: \d+ label voxel\(s\) are not integers \(e\.g\. 0\.5"):
        LabelToRegionsd("label", BRATS)(loaded)


def test_a_training_set_without_any_foreground_stops_before_training(tmp_path, demo_dir):
    data = tmp_path / "data"
    for name in ("Demo_000", "Demo_001", "Demo_002"):
        seg = _files(_case(demo_dir, name, data))["seg"]
        _rewrite(seg, np.zeros(nib.load(seg).shape, np.uint8))
    with pytest.raises(Exception) as error:
        run("training", config_file=TRAIN, bundle_root=str(tmp_path / "b"), dataset_dir=str(data), **TINY)
    text = messages(error.value)
    assert "none of the 2 training label map(s) (Demo_00" in text and "label_convention" in text
    assert not (tmp_path / "b" / "models" / "model.pt").exists()


# channels in the wrong order ------------------------------------------------------------------------------------


def test_modality_files_with_a_trailing_singleton_axis_stack_as_modalities(tmp_path, demo_dir):
    case = _case(demo_dir, "Demo_001", tmp_path)
    item = _item(case)
    select = SelectModalitiesd("image")
    load = LoadCaseImaged(["image", "label"], image_only=True)
    expected = select(EnsureChannelFirstd(["image", "label"])(load(item)))["image"]
    for file in item["image"]:
        _rewrite(file, np.asarray(nib.load(file).dataobj)[..., None])  # (X, Y, Z, 1), as some converters write
    assert nib.load(item["image"][0]).shape == (40, 40, 24, 1)
    got = select(EnsureChannelFirstd(["image", "label"])(load(item)))["image"]
    assert torch.equal(got, expected)  # T1c, T2, FLAIR, not the 4D (MSD) order


# geometry never cross-checked -----------------------------------------------------------------------------------


def test_a_label_stored_flipped_is_refused_naming_both_files_and_affines(tmp_path, demo_dir):
    case = _case(demo_dir, "Demo_002", tmp_path)
    item = _item(case)
    image = nib.load(item["label"])
    flipped = image.affine.copy()
    flipped[:, 0] *= -1
    flipped[:3, 3] += image.affine[:3, 0] * (image.shape[0] - 1)  # the same physical image, stored flipped
    _rewrite(item["label"], np.asarray(image.dataobj)[::-1].copy(), flipped)
    pattern = rf"case 'Demo_002': '{item['image'][0]}' and '{item['label']}' have the same shape but different affines"
    with pytest.raises(ValueError, match=pattern) as error:  # training: one loader for both
        LoadCaseImaged(["image", "label"], image_only=True)(item)
    assert "[[ -1." in str(error.value) and "resample the label" in str(error.value)
    # evaluation: the label is loaded first, the image by a second loader
    label = LoadCaseImaged("label", image_only=True)({"label": item["label"], "case": "Demo_002"})
    with pytest.raises(ValueError, match="have the same shape but different affines"):
        LoadCaseImaged("image", image_only=True)({**label, "image": item["image"]})


def test_modalities_with_different_affines_name_the_two_files(tmp_path, demo_dir):
    case = _case(demo_dir, "Demo_002", tmp_path)
    item = _item(case)
    moved = nib.load(item["image"][2]).affine.copy()
    moved[1, 3] += 5.0
    _rewrite(item["image"][2], affine=moved)
    with pytest.raises(ValueError) as error:
        LoadCaseImaged(["image", "label"], image_only=True)(item)
    text = str(error.value)
    assert (
        f"modality files '{item['image'][0]}' and '{item['image'][2]}' have the same shape but different affines"
        in text
    )
    assert "largest difference 5" in text


# inputs that carry no signal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["constant", "one voxel", "zeros"])
def test_a_modality_without_signal_is_refused_naming_the_file_unless_allowed(tmp_path, demo_dir, weights, content):
    case = _case(demo_dir, "Demo_003", tmp_path / "data")
    t1ce = _files(case)["t1ce"]
    array = np.zeros(nib.load(t1ce).shape, np.float32)
    if content == "constant":
        array[:] = 5.0
    elif content == "one voxel":
        array[20, 20, 12] = 7.0
    _rewrite(t1ce, array)
    run_inference = dict(config_file=INFERENCE, dataset_dir=str(tmp_path / "data"), ckpt_path=str(weights), **SMALL_NET)
    with pytest.raises(Exception) as error:
        run(output_dir=str(tmp_path / "out"), continue_on_error=False, **run_inference)
    text = messages(error.value)
    assert f"case 'Demo_003': '{t1ce}' is {'empty' if content == 'zeros' else 'constant over the head'}" in text
    assert "--allow_constant_modality true" in text
    assert not (tmp_path / "out" / "Demo_003_seg.nii.gz").exists()
    run(output_dir=str(tmp_path / "allowed"), allow_constant_modality=True, **run_inference)
    assert (tmp_path / "allowed" / "Demo_003_seg.nii.gz").exists()


# inputs overwritten ---------------------------------------------------------------------------------------------


def test_output_dir_equal_to_a_flat_brats_folder_is_refused_and_the_ground_truth_kept(tmp_path, demo_dir, weights):
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in (Path(demo_dir) / "Demo_000").iterdir():
        shutil.copy(file, flat / file.name)
    truth = (flat / "Demo_000_seg.nii.gz").read_bytes()
    with pytest.raises(Exception) as error:
        run(config_file=INFERENCE, dataset_dir=str(flat), output_dir=str(flat), ckpt_path=str(weights), **SMALL_NET)
    text = messages(error.value)
    assert (
        f"the output of case 'Demo_000', '{flat / 'Demo_000_seg.nii.gz'}', would be written inside dataset_dir" in text
    )
    assert "--output_dir" in text
    assert (flat / "Demo_000_seg.nii.gz").read_bytes() == truth
    assert sorted(p.name for p in flat.iterdir()) == sorted(f"Demo_000_{m}.nii.gz" for m in (*MODALITIES, "seg"))


def test_an_output_that_is_an_input_file_of_the_run_is_refused(tmp_path, demo_dir, weights):
    from bundle.saving import SaveCaseImaged, refuse_overwriting_inputs

    item = _item(Path(demo_dir) / "Demo_000")
    saver = SaveCaseImaged("pred", output_dir=str(Path(demo_dir) / "Demo_000"), output_postfix="flair")
    with pytest.raises(ValueError, match=r"is the image file of case 'Demo_000': writing it would destroy an input"):
        refuse_overwriting_inputs([item], [saver])
    refuse_overwriting_inputs([item], [SaveCaseImaged("pred", output_dir=str(tmp_path))], str(demo_dir))  # fine


# cases dropped without a word -----------------------------------------------------------------------------------


def test_linked_case_folders_are_followed_and_every_skipped_file_is_listed(tmp_path, demo_dir, caplog):
    store, data = tmp_path / "store", tmp_path / "data"
    data.mkdir()
    for name in ("Demo_000", "Demo_001", "Demo_002"):
        _case(demo_dir, name, store)
        (data / name).symlink_to(store / name, target_is_directory=True)
    (data / "notes.txt").write_text("x")
    (data / "loop").symlink_to(data, target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="bundle.cases"):
        items = inference_datalist(str(data))
    assert [item["case"] for item in items] == ["Demo_000", "Demo_001", "Demo_002"]
    assert f"found 3 case(s) under '{data}' (3 with a label)" in caplog.text
    assert (
        "1 not a BraTS file name (notes.txt)" in caplog.text
        and "1 a link to a folder already scanned (loop)" in caplog.text
    )


def test_a_brats_folder_with_screenshots_and_a_labels_folder_is_read_as_brats(tmp_path, demo_dir, caplog):
    data = tmp_path / "data"
    for name in ("Demo_000", "Demo_001", "Demo_002"):
        _case(demo_dir, name, data)
    for folder in ("labels", "screenshots"):
        (data / folder).mkdir()
        (data / folder / "Demo_000.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING):
        built = build_datalist(str(data))
        items = inference_datalist(str(data))
    assert sorted(i["case"] for i in built["training"] + built["validation"]) == ["Demo_000", "Demo_001", "Demo_002"]
    assert [i["case"] for i in items] == ["Demo_000", "Demo_001", "Demo_002"]
    assert "using the BraTS cases, ignoring the 2D images" in caplog.text


def test_evaluation_never_scores_a_case_the_model_was_trained_on(tmp_path, demo_dir):
    data = tmp_path / "data"
    for name in ("Demo_000", "Demo_001", "Demo_002", "Demo_003"):
        _case(demo_dir, name, data)
    split = build_datalist(str(data))
    held_out = [item["case"] for item in split["validation"]]
    ckpt = tmp_path / "models" / "model.pt"
    record_split(ckpt.parent, split["training"], split["validation"], str(data))
    # a label goes missing after training: the split is not re-drawn, the record's held-out cases are scored
    lost = next(item for item in split["training"] if item["case"] not in held_out)
    os.remove(data / lost["label"])
    assert [item["case"] for item in evaluation_datalist("", str(data), "validation", str(ckpt))] == held_out
    # a datalist naming a training case is refused, naming it
    trained = next(item for item in split["training"] if item is not lost)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"validation": [trained]}))
    with pytest.raises(
        ValueError, match=rf"1 case\(s\) to evaluate were used to train this model \({trained['case']};"
    ):
        evaluation_datalist(str(listed), str(data), "validation", str(ckpt))
    # no record and a case dropped for its missing label: refused, naming it
    os.remove(ckpt.parent / SPLIT_RECORD)
    with pytest.raises(ValueError, match=rf"cannot tell which cases .* have no label \({lost['case']}\)"):
        evaluation_datalist("", str(data), "validation", str(ckpt))


@pytest.mark.slow
def test_training_records_its_split_beside_the_model(tmp_path, demo_dir):
    run(
        "training", config_file=TRAIN, bundle_root=str(tmp_path), dataset_dir=str(demo_dir), **{**TINY, "max_epochs": 1}
    )
    record = json.loads((tmp_path / "models" / SPLIT_RECORD).read_text())
    split = build_datalist(str(demo_dir))
    assert [i["case"] for i in record["validation"]] == [i["case"] for i in split["validation"]]
    assert (
        record["training"][0]["image"][0] == f"{split['training'][0]['case']}/{split['training'][0]['case']}_t1.nii.gz"
    )
    assert (tmp_path / "models" / "model.pt").exists()


# overrides that fail far from the key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, key, value, accepted",
    [
        (TRAIN, "max_epochs", "ten", "an integer >= 1"),
        (TRAIN, "crop_size", [180, 180], "a list of 3 positive integers"),
        (TRAIN, "regions", {}, "a non-empty mapping of region name"),
        (TRAIN, "regions", {"tumor": []}, "a non-empty mapping of region name"),
        (TRAIN, "label_convention", "brats2019", "one of 'brats', 'brats2023', 'brats2024', 'msd'"),
        (TRAIN, "modalities", ["t1c", "t1c"], "distinct modalities"),
        (TRAIN, "modalities", ["t1c", "dwi"], "distinct modalities"),
        (INFERENCE, "threshold", 1.5, "a number in (0, 1)"),
        (INFERENCE, "sw_batch_size", 0, "an integer >= 1"),
        (INFERENCE, "label_convention", "brats2019", "one of 'brats', 'brats2023', 'brats2024', 'msd'"),
    ],
)
def test_a_bad_override_is_named_with_its_value_and_what_is_accepted(config, key, value, accepted):
    parser = ConfigParser()
    parser.read_config(config)
    parser.update({key: value})
    with pytest.raises(ValueError) as error:
        check_settings(parser)
    assert str(error.value).startswith(f"`{key}` is {value!r}") and accepted in str(error.value)


def test_every_shipped_config_passes_the_settings_check():
    for files in (TRAIN, INFERENCE, [INFERENCE, EVALUATE], [TRAIN, str(ROOT / "configs" / "demo.json")]):
        parser = ConfigParser()
        parser.read_config(files)
        check_settings(parser)


def test_the_settings_check_runs_before_any_work(tmp_path, demo_dir, weights):
    with pytest.raises(Exception) as error:
        run(
            "training",
            config_file=TRAIN,
            bundle_root=str(tmp_path),
            dataset_dir=str(demo_dir),
            **{**TINY, "max_epochs": "ten"},
        )
    assert "`max_epochs` is 'ten' (str); it must be an integer >= 1. Fix --max_epochs." in messages(error.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()
    with pytest.raises(Exception) as error:
        run(
            config_file=INFERENCE,
            dataset_dir=str(demo_dir),
            output_dir=str(tmp_path / "out"),
            ckpt_path=str(weights),
            threshold=1.5,
            **SMALL_NET,
        )
    assert "`threshold` is 1.5 (float); it must be a number in (0, 1)" in messages(error.value)
    assert not (tmp_path / "out").exists()


# stale derived files --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_onnx_export_of_other_weights_is_refused_naming_both_files(tmp_path, demo_dir, weights):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from monai.bundle.scripts import onnx_export

    from bundle.provenance import origin_path

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(weights, models / "model.pt")
    torch.manual_seed(1)
    torch.save(_network().state_dict(), models / "other.pt")
    onnx_export(
        net_id="network_def",
        filepath=str(models / "model.onnx"),
        ckpt_file=str(models / "other.pt"),
        config_file=INFERENCE,
        use_trace=True,
        input_shape=[1, 3, 64, 64],
        features=TINY["features"],
        converter_kwargs={
            "dynamo": False,
            "input_names": ["image"],
            "output_names": ["pred"],
            "dynamic_axes": {"image": {0: "batch", 2: "h", 3: "w"}, "pred": {0: "batch", 2: "h", 3: "w"}},
        },
    )
    infer = dict(
        config_file=INFERENCE,
        dataset_dir=str(demo_dir / "Demo_000"),
        backend="onnxruntime",
        onnx_path=str(models / "model.onnx"),
        **SMALL_NET,
    )
    with pytest.raises(Exception) as error:  # no record: compared by what it computes
        run(output_dir=str(tmp_path / "out"), ckpt_path=str(models / "model.pt"), **infer)
    text = messages(error.value)
    assert f"'{models / 'model.onnx'}' does not compute what the weights in '{models / 'model.pt'}' compute" in text
    assert "onnx_export" in text and not (tmp_path / "out").exists()
    # with the weights it came from: it runs, and the origin is recorded beside it
    run(output_dir=str(tmp_path / "ok"), ckpt_path=str(models / "other.pt"), **infer)
    assert json.loads(Path(origin_path(models / "model.onnx")).read_text())["weights"] == str(models / "other.pt")
    # recorded: the hash names the weights it was exported from
    with pytest.raises(Exception) as error:
        run(output_dir=str(tmp_path / "out"), ckpt_path=str(models / "model.pt"), **infer)
    assert f"was exported from other weights ('{models / 'other.pt'}'" in messages(error.value)
