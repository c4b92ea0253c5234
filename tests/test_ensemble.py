"""Ensembles at inference: ``--ensemble "['a/model.pt','b/model.pt']"`` averages the members' probabilities before the
thresholding; members must agree on what they take and give (their recipes), and may differ in width and skip mode."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.checkpoints import read_recipe, write_recipe
from bundle.ensemble import EnsembleNetwork, check_members, member_paths
from bundle.networks import SegANSegmentor

# MONAI's own HausdorffDistanceMetric passes a deprecated argument to get_mask_edges; nothing to do with this bundle
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")

INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
CASES = ["Demo_000", "Demo_001", "Demo_002", "Demo_003"]
#: the two members: other seeds, other widths, other skip modes; the same inputs and outputs
MEMBERS = {
    "a": {},  # the default seed, 0
    "b": {"seed": 1, "features": [8, 16, 32, 64], "skip": "add"},
}


@pytest.fixture(scope="module")
def members(tiny_bundle, demo_dir):
    """Two tiny models trained 1 epoch each on the demo data: their model.pt files."""
    return [str(tiny_bundle(demo_dir, **settings) / "models" / "model.pt") for settings in MEMBERS.values()]


def _infer(demo_dir, output_dir, **overrides):
    run(
        config_file=INFERENCE,
        bundle_root=str(output_dir.parent / "no_model"),  # no models/model.pt: everything comes from the members
        dataset_dir=str(demo_dir),
        output_dir=str(output_dir),
        **{"num_workers": 0, "progress": False, **overrides},
    )
    return {case: np.asarray(nib.load(str(output_dir / f"{case}_seg.nii.gz")).dataobj) for case in CASES}


def _errors(error) -> str:
    text, e = [], error
    while e is not None:
        text.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(text)


def _probabilities(path, image):
    """The sigmoid of the member at ``path`` over the axial slices of ``image`` (C, H, W, D), built by hand."""
    recipe = read_recipe(path)
    network = SegANSegmentor(in_channels=3, out_channels=3, features=recipe["features"], skip=recipe["skip"])
    network.load_state_dict(torch.load(path, weights_only=True))
    network.eval()
    with torch.no_grad():
        logits = network(torch.as_tensor(np.moveaxis(image, -1, 0)))  # (D, C, H, W): slices as a batch
    return np.moveaxis(torch.sigmoid(logits).numpy(), 0, -1)


@pytest.mark.slow
def test_the_ensemble_thresholds_the_mean_of_the_members_probabilities(members, demo_dir, tmp_path):
    assert read_recipe(members[0])["features"] != read_recipe(members[1])["features"]
    full_frame = {"crop_foreground": False, "head_guard": False}
    maps = _infer(demo_dir, tmp_path / "out", ensemble=members, **full_frame)
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"bundle_root": str(tmp_path), "ckpt_path": members[0], **full_frame})
    preprocessing = parser.get_parsed_content("preprocessing")
    labels = read_recipe(members[0])["region_labels"]
    differs = 0
    for case in CASES:
        files = [str(demo_dir / case / f"{case}_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
        image = np.asarray(preprocessing({"image": files})["image"])  # normalised, padded to 48 x 48 in plane
        assert image.shape == (3, 48, 48, 24)
        probabilities = [_probabilities(path, image)[:, 4:44, 4:44] for path in members]
        mean = (probabilities[0] + probabilities[1]) / 2
        expected = np.zeros(mean.shape[1:], np.uint8)
        for region, value in enumerate(labels):
            expected[mean[region] >= 0.5] = value
        ambiguous = (np.abs(mean - 0.5) < 1e-5).any(0)
        assert ambiguous.mean() < 0.01 and len(np.unique(expected)) > 1
        np.testing.assert_array_equal(maps[case][~ambiguous], expected[~ambiguous])
        differs += sum(int(((p >= 0.5) != (mean >= 0.5)).any()) for p in probabilities)
    assert differs  # the mean is not either member's own map


@pytest.mark.slow
def test_an_ensemble_of_one_is_that_models_inference(members, demo_dir, tmp_path):
    single = _infer(demo_dir, tmp_path / "single", ckpt_path=members[1])
    ensemble = _infer(demo_dir, tmp_path / "ensemble", ensemble=[members[1]])
    for case in CASES:
        np.testing.assert_array_equal(ensemble[case], single[case])


def _member_copy(path, folder, recipe=True, **changes):
    """``path``'s weights in ``folder``, with its recipe changed by ``changes``, or without one (``recipe=False``)."""
    folder.mkdir(parents=True)
    copy = str(shutil.copy(path, folder / "model.pt"))
    if recipe:
        write_recipe(copy, {**read_recipe(path), **changes})
    return copy


@pytest.mark.slow
def test_members_that_disagree_on_their_inputs_are_refused_naming_both_files_and_the_setting(
    members, demo_dir, tmp_path
):
    odd = _member_copy(members[1], tmp_path / "odd", normalization="percentile")
    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "out", ensemble=[members[0], odd])
    text = _errors(error.value)
    assert "ensemble members disagree on `normalization`" in text
    assert f"'{members[0]}' was trained with normalization 'zscore'" in text and f"'{odd}' with 'percentile'" in text
    bare = _member_copy(members[1], tmp_path / "bare", recipe=False)
    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "out", ensemble=[members[0], bare])
    text = _errors(error.value)
    assert f"ensemble member '{bare}' has no recipe record" in text and f"checked against '{members[0]}'" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_evaluation_of_an_ensemble_scores_the_cases_no_member_trained_on(members, demo_dir, tmp_path):
    out = tmp_path / "eval"
    run(
        config_file=[INFERENCE, EVALUATE],
        bundle_root=str(tmp_path / "no_model"),
        dataset_dir=str(demo_dir),
        output_dir=str(out),
        ensemble=members,
        num_workers=0,
        progress=False,
    )
    held_out = [
        item["case"] for item in json.loads(Path(members[0]).with_name("datalist.json").read_text())["validation"]
    ]
    rows = list(csv.DictReader((out / "metrics_per_case.csv").open()))
    assert held_out and sorted({row["case"] for row in rows}) == sorted(held_out)
    assert all(0 <= float(row[f"dice_{region}"]) <= 1 for row in rows for region in ("whole_tumor", "enhancing_tumor"))
    # a member trained on the evaluated cases (as each fold of a cross-validation is on the others') is refused
    fold = tmp_path / "fold" / "models"
    trained_on_all = _member_copy(members[1], fold)
    record = {"training": [{"image": "x", "case": c} for c in CASES], "validation": []}
    (fold / "datalist.json").write_text(json.dumps(record))
    with pytest.raises(Exception) as error:
        run(
            config_file=[INFERENCE, EVALUATE],
            bundle_root=str(tmp_path / "no_model"),
            dataset_dir=str(demo_dir),
            output_dir=str(tmp_path / "refused"),
            ensemble=[members[0], trained_on_all],
            num_workers=0,
            progress=False,
        )
    assert f"were used to train ensemble member '{trained_on_all}'" in _errors(error.value)


@pytest.mark.slow
def test_the_onnxruntime_backend_runs_each_members_export(members, demo_dir, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from monai.bundle.scripts import onnx_export

    exported = []
    for i, path in enumerate(members):
        copy = _member_copy(path, tmp_path / f"member{i}")
        onnx_export(
            net_id="network_def",
            filepath=copy.replace(".pt", ".onnx"),  # beside the weights, where the ensemble looks for it
            ckpt_file=copy,
            config_file=INFERENCE,
            bundle_root=str(tmp_path),
            ckpt_path=copy,  # the network of this member's recipe
            use_trace=True,
            input_shape=[1, 3, 64, 64],
            converter_kwargs={
                "dynamo": False,
                "input_names": ["image"],
                "output_names": ["pred"],
                "dynamic_axes": {
                    "image": {0: "batch", 2: "height", 3: "width"},
                    "pred": {0: "batch", 2: "height", 3: "width"},
                },
            },
        )
        exported.append(copy)
    eager = _infer(demo_dir, tmp_path / "pytorch", ensemble=exported)
    onnx = _infer(demo_dir, tmp_path / "onnx", ensemble=exported, backend="onnxruntime")
    for case in CASES:
        assert eager[case].any() and (onnx[case] != eager[case]).mean() < 1e-3  # a voxel whose mean rounds across 0.5
    (tmp_path / "member1" / "model.onnx").unlink()
    with pytest.raises(Exception) as error:
        _infer(demo_dir, tmp_path / "missing", ensemble=exported, backend="onnxruntime")
    assert f"no ONNX model at '{tmp_path / 'member1' / 'model.onnx'}'" in _errors(error.value)


def _tiny(seed, out_channels=3):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, out_channels, 3, padding=1)


def test_the_ensemble_network_returns_the_logit_of_the_mean_probability():
    x = torch.randn(5, 3, 16, 16)
    members = [_tiny(0), _tiny(1), _tiny(2)]
    with torch.no_grad():
        region = EnsembleNetwork(members)(x)
        expected = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        torch.testing.assert_close(torch.sigmoid(region), expected.clamp(1e-6, 1 - 1e-6), rtol=0, atol=1e-6)
        assert torch.isfinite(region).all()
        multi = EnsembleNetwork(members, multiclass=True)(x)
        expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(multi, 1), expected, rtol=0, atol=1e-5)
        assert torch.equal(multi.argmax(1), expected.argmax(1))
        torch.testing.assert_close(EnsembleNetwork(members[:1])(x), members[0](x), rtol=0, atol=0)


def test_member_checks(tmp_path):
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.save({}, tmp_path / name / "model.pt")
        write_recipe(str(tmp_path / name / "model.pt"), {"modalities": ["t2", "flair"], "features": [4, 8]})
        paths.append(str(tmp_path / name / "model.pt"))
    assert member_paths([]) == [] and member_paths(paths) == paths
    assert len(check_members(paths, {"modalities": ["t2", "flair"]})) == 2
    write_recipe(paths[1], {"modalities": ["t2", "flair"], "features": [8, 16]})  # other widths: fine
    check_members(paths)
    with pytest.raises(ValueError, match=r"`modalities` is \['t1c'\] in this run, but ensemble member"):
        check_members(paths, {"modalities": ["t1c"]})
    write_recipe(paths[1], {"modalities": ["flair"], "features": [4, 8]})
    with pytest.raises(ValueError, match=r"disagree on `modalities`: '.*/a/model.pt' .*\['t2', 'flair'\], '.*/b/model"):
        check_members(paths)
    with pytest.raises(ValueError, match="the same weights twice"):
        member_paths([paths[0], paths[0]])
    with pytest.raises(FileNotFoundError, match="no such file"):
        member_paths([str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="must be a list of weight files"):
        member_paths(paths[0])
