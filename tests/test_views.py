"""Views: ``slice_axis`` trains and runs a 2D segmentor along any stored axis (2, axial, the paper's; 0 and 1 the
sagittal and coronal views of BraTS-layout volumes), and an ensemble of models trained along different axes
averages every member's probabilities, each member seeing the volume along its own axis."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, load_script
from monai.bundle.scripts import run

from bundle.checkpoints import read_recipe
from bundle.ensemble import EnsembleNetwork
from bundle.inferers import ForegroundSliceInferer
from bundle.transforms import ContextSlicesd, view_grid, view_order

INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")


class _Slicewise(torch.nn.Module):
    """A 2D network whose output depends on where in the slice a voxel is (a view change shows)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _volume(shape=(2, 12, 10, 8)) -> torch.Tensor:
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def test_a_view_keeps_the_other_axes_in_stored_order_and_slices_along_the_chosen_one():
    assert view_order(2) == [0, 1, 2] and view_order(0) == [1, 2, 0] and view_order(1) == [0, 2, 1]
    with pytest.raises(ValueError, match="slice_axis must be one of"):
        view_order(3)
    # the network's down-sampling factor on every axis some view sees in plane, 1 across slices
    assert view_grid([2], 16) == [16, 16, 1] and view_grid([0], 16) == [1, 16, 16]
    assert view_grid([0, 2], 16) == [16, 16, 16] and view_grid([2], 16, 0) == [16, 16, 0]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_inferer_along_an_axis_is_the_axial_inferer_on_the_volume_turned_to_that_view(axis):
    network, volume = _Slicewise(0).eval(), _volume()
    along = ForegroundSliceInferer(3, roi_size=[-1, -1], sw_batch_size=5, spatial_dim=2, slice_axis=axis)
    axial = ForegroundSliceInferer(3, roi_size=[-1, -1], sw_batch_size=5, spatial_dim=2)
    turned = axial(volume.movedim(2 + axis, -1), network).movedim(-1, 2 + axis)
    assert torch.allclose(along(volume, network), turned, atol=1e-6)
    assert along(volume, network).shape == (1, 3, 12, 10, 8)


def test_context_slices_are_stacked_along_the_slice_axis():
    volume = _volume()[0]
    along = ContextSlicesd("image", context_slices=1, slice_axis=0)({"image": volume})["image"]
    axial = ContextSlicesd("image", context_slices=1)({"image": volume.movedim(1, -1)})["image"]
    assert torch.equal(along, axial.movedim(-1, 1))


def test_a_multi_view_ensemble_averages_every_members_probability_along_its_own_axis():
    a, b, c = (_Slicewise(seed).eval() for seed in range(3))
    volume = _volume()
    inferer = ForegroundSliceInferer(3, roi_size=[-1, -1], sw_batch_size=4, spatial_dim=2)
    ensemble = EnsembleNetwork([a, b, c], slice_axes=[2, 0, 2])
    out = inferer(volume, ensemble)

    def along(network, axis):
        return torch.sigmoid(
            ForegroundSliceInferer(3, roi_size=[-1, -1], spatial_dim=2, slice_axis=axis)(volume, network)
        )

    expected = (along(a, 2) + along(b, 0) + along(c, 2)) / 3
    assert torch.allclose(torch.sigmoid(out), expected, atol=1e-5)
    assert [(axis, size) for axis, _, size in ensemble.views()] == [(0, 1), (2, 2)]
    with pytest.raises(RuntimeError, match="ForegroundSliceInferer"):
        ensemble(volume[..., 0])  # mixed views cannot share one batch of slices


@pytest.fixture(scope="module")
def sagittal(tiny_bundle, demo_dir):
    """A tiny model trained along the first stored axis, and one along the third (axial, the default), 1 epoch each."""
    return {0: tiny_bundle(demo_dir, slice_axis=0), 2: tiny_bundle(demo_dir)}


@pytest.mark.slow
def test_a_model_trained_along_another_axis_records_it_and_inference_slices_the_same_way(sagittal, demo_dir, tmp_path):
    weights = sagittal[0] / "models" / "model.pt"
    assert read_recipe(str(weights))["slice_axis"] == 0
    history = json.loads((sagittal[0] / "eval" / "validation_metrics.json").read_text())
    assert history["history"], "validation ran along the sagittal view"
    out = tmp_path / "pred"
    run(
        config_file=INFERENCE,
        ckpt_path=str(weights),
        dataset_dir=str(demo_dir),
        output_dir=str(out),
        num_workers=0,
        progress=False,
    )
    source = nib.load(str(next(demo_dir.glob("Demo_000/*flair*"))))
    written = nib.load(str(out / "Demo_000_seg.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    with pytest.raises(Exception, match="slice_axis"):
        run(
            config_file=INFERENCE,
            ckpt_path=str(weights),
            dataset_dir=str(demo_dir),
            output_dir=str(tmp_path / "x"),
            num_workers=0,
            progress=False,
            slice_axis=2,
        )  # the recipe says 0: a contradicting override is refused


@pytest.mark.slow
def test_the_multi_view_ensemble_evaluates_through_the_configs(sagittal, demo_dir, tmp_path):
    members = [str(sagittal[axis] / "models" / "model.pt") for axis in (2, 0)]
    out = tmp_path / "eval"
    run(
        config_file=[INFERENCE, EVALUATE],
        ensemble=members,
        dataset_dir=str(demo_dir),
        output_dir=str(out),
        data_list_file_path="",
        num_workers=0,
        progress=False,
    )
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["num_cases"] >= 1 and set(summary["metrics"]["dice"]) == {
        "whole_tumor",
        "tumor_core",
        "enhancing_tumor",
    }


@pytest.mark.slow
def test_a_packed_multi_view_ensemble_is_served_as_one_model(sagittal, demo_dir, tmp_path, monkeypatch):
    """``package_bundle.py --ensemble`` ships the members as one ``models/model.pt`` and a ``network_def`` that builds
    their ensemble: the unpacked bundle's own inference equals ``--ensemble`` of the members, and so does what MONAI
    Label does with it (build ``network_def``, load ``models/model.pt`` strictly, run preprocessing, inferer and
    postprocessing)."""
    import zipfile

    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    members = [str(sagittal[axis] / "models" / "model.pt") for axis in (2, 0)]
    common = dict(dataset_dir=str(demo_dir), num_workers=0, progress=False)
    run(config_file=INFERENCE, ensemble=members, output_dir=str(tmp_path / "option"), **common)

    package = load_script("package_bundle")
    archive = package.main(output_dir=str(tmp_path / "dist"), bundle_root=str(ROOT), ensemble=members)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / "segan"
    assert read_recipe(str(bundle / "models" / "model.pt"))["ensemble"][1]["slice_axis"] == 0
    run(config_file=str(bundle / "configs" / "inference.json"), output_dir=str(tmp_path / "packed"), **common)

    monkeypatch.syspath_prepend(str(bundle))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "cpu", "dataset_dir": str(demo_dir)})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    network.eval()
    pre = Compose(parser.get_parsed_content("preprocessing").transforms)
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    inferer = parser.get_parsed_content("inferer")
    items = {item["case"]: item for item in parser.get_parsed_content("dataset#data")}
    for case in ("Demo_000", "Demo_003"):
        option = np.asarray(nib.load(str(tmp_path / "option" / f"{case}_seg.nii.gz")).dataobj)
        packed = np.asarray(nib.load(str(tmp_path / "packed" / f"{case}_seg.nii.gz")).dataobj)
        np.testing.assert_array_equal(packed, option)
        data = pre(dict(items[case]))
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], network)[0]
        served = np.asarray(post(data)["pred"]).squeeze(0)
        np.testing.assert_array_equal(served, option)
