"""Inference time (issue 19, item 1): the direct slice path and the allocator setting change how fast, not what.

The claims: ``ForegroundSliceInferer`` over whole slices gives MONAI's ``SliceInferer`` result bit for bit (any
batch size, several cases, NHWC weights, autocast), returns a normal tensor carrying the input's metadata, and
leaves other settings to ``SliceInferer``; ``reuse_memory`` leaves the written label map unchanged. With
``slice_margin`` each slice goes through the network cropped to its own foreground box (on the network's grid,
batched by box size), its output is the whole slice's wherever the box reaches beyond the input's foreground by
the margin, and background (``background_logit``) elsewhere; a slice with no foreground is not computed.
"""

import sys

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from bundle.inferers import ForegroundSliceInferer
from bundle.networks import SegANSegmentor
from bundle.speed import reuse_memory


def _network(channels_last=False):
    torch.manual_seed(0)
    network = SegANSegmentor(in_channels=3, out_channels=3, features=[4, 8, 16, 32]).eval()
    return network.to(memory_format=torch.channels_last) if channels_last else network


def _volume(batch=1, depth=7):
    generator = torch.Generator().manual_seed(1)
    return MetaTensor(torch.randn(batch, 3, 32, 48, depth, generator=generator), meta={"case": "Case_0"})


def _both(inputs, network, sw_batch_size, roi_size=(-1, -1), **kwargs):
    ours = ForegroundSliceInferer(3, roi_size=roi_size, sw_batch_size=sw_batch_size, spatial_dim=2, **kwargs)
    monai = SliceInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, spatial_dim=2, **kwargs)
    with torch.no_grad():  # as SupervisedEvaluator runs the inferer
        return ours(inputs, network), monai(inputs, network)


@pytest.mark.parametrize("sw_batch_size", [1, 3, 4, 16])
@pytest.mark.parametrize("batch", [1, 2])
def test_whole_slices_give_slice_inferers_result_bit_for_bit(sw_batch_size, batch):
    ours, monai = _both(_volume(batch), _network(), sw_batch_size)
    assert ours.shape == monai.shape == (batch, 3, 32, 48, 7)
    assert torch.equal(ours.as_tensor(), monai.as_tensor())


def test_channels_last_weights_and_autocast_give_slice_inferers_result():
    network = _network(channels_last=True)
    ours, monai = _both(_volume(), network, 4)
    assert torch.equal(ours.as_tensor(), monai.as_tensor())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, monai = _both(_volume(), network, 4)
    assert ours.dtype == monai.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), monai.as_tensor())


def test_the_prediction_carries_the_input_metadata_and_can_be_changed_in_place():
    ours, monai = _both(_volume(), _network(), 4)
    assert isinstance(ours, MetaTensor) and ours.meta["case"] == monai.meta["case"] == "Case_0"
    assert not ours.is_inference()
    ours.sigmoid_()  # post-processing may work in place outside inference mode


def test_patches_smaller_than_the_slice_go_through_slice_inferer():
    ours, monai = _both(_volume(), _network(), 4, roi_size=(16, 16))
    assert torch.equal(ours.as_tensor(), monai.as_tensor())


class _Counting(torch.nn.Module):
    """``network``, recording the shape of every batch it is given."""

    def __init__(self, network):
        super().__init__()
        self.network, self.shapes = network, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.network(x)


def _islands(batch=1):
    """(batch, 3, 64, 80, 6) zeros with a foreground block of another size in each slice; slice 3 empty."""
    generator = torch.Generator().manual_seed(2)
    volume = torch.zeros(batch, 3, 64, 80, 6)
    blocks = [(5, 20, 10, 30), (30, 60, 2, 78), (0, 64, 0, 80), None, (40, 45, 60, 70), (5, 20, 10, 30)]
    for z, block in enumerate(blocks):
        if block is not None:
            y0, y1, x0, x1 = block
            volume[:, :, y0:y1, x0:x1, z] = torch.randn(batch, 3, y1 - y0, x1 - x0, generator=generator)
    return MetaTensor(volume, meta={"case": "Case_0"})


def _cropped(inputs, network, margin, sw_batch_size=4, **kwargs):
    inferer = ForegroundSliceInferer(
        3, roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, slice_margin=margin, slice_grid=16, **kwargs
    )
    with torch.no_grad():
        return inferer(inputs, network)


@pytest.mark.parametrize("batch", [1, 2])
def test_slices_cropped_to_their_foreground_run_in_grid_boxes_batched_by_size(batch):
    network = _Counting(_network())
    inputs = _islands(batch)
    ours = _cropped(inputs, network, margin=0, sw_batch_size=2)
    whole = _both(inputs, _network(), 4)[0]
    # boxes on the 16-voxel grid: slices 0 and 5 are 32x32 (their block 5-20 x 10-30 -> 0-32 x 0-32), slice 1
    # 48x80, slice 2 the whole 64x80, slice 4 16x32 (40-45 x 60-70 -> 32-48 x 48-80); slice 3 is not computed
    boxes = {0: (0, 32, 0, 32), 1: (16, 64, 0, 80), 2: (0, 64, 0, 80), 4: (32, 48, 48, 80), 5: (0, 32, 0, 32)}
    sizes = sorted(shape[2:] for shape in network.shapes for _ in range(shape[0]))
    assert sizes == sorted([(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes.values()] * batch)
    assert all(shape[0] <= 2 and shape[2] % 16 == 0 and shape[3] % 16 == 0 for shape in network.shapes)
    assert network.shapes[0][2:] == (64, 80)  # the largest box first: smaller batches reuse its freed memory
    assert isinstance(ours, MetaTensor) and ours.meta["case"] == "Case_0" and ours.shape == whole.shape
    inside = torch.zeros(ours.shape, dtype=torch.bool)
    for z, (y0, y1, x0, x1) in boxes.items():
        inside[..., y0:y1, x0:x1, z] = True
    assert torch.all(ours[~inside] == -1e4)
    torch.testing.assert_close(ours[..., 2], whole[..., 2])  # a box the size of the slice is the whole slice
    assert not torch.equal(ours[..., 0][inside[..., 0]], whole[..., 0][inside[..., 0]])  # the box's own edges


def test_a_margin_as_wide_as_the_slice_gives_the_whole_slices_result_where_there_is_foreground():
    inputs = _islands()
    ours = _cropped(inputs, _network(), margin=80)
    whole = _both(inputs, _network(), 4)[0]
    computed = [0, 1, 2, 4, 5]
    torch.testing.assert_close(ours[..., computed], whole[..., computed])
    assert torch.all(ours[..., 3] == -1e4)


def test_cropped_slices_with_channels_last_weights_and_a_background_of_choice():
    inputs = _islands()
    ours = _cropped(inputs, _network(channels_last=True), margin=0, background_logit=-50.0)
    plain = _cropped(inputs, _network(), margin=0, background_logit=-50.0)
    torch.testing.assert_close(ours, plain)
    assert torch.all(ours[..., 3] == -50.0)


def test_no_foreground_in_any_slice_is_background_without_a_network_call():
    network = _Counting(_network())
    out = _cropped(MetaTensor(torch.zeros(1, 3, 32, 48, 4)), network, margin=16)
    assert network.shapes == [] and out.shape == (1, 3, 32, 48, 4) and torch.all(out == -1e4)


def test_slices_off_the_grid_are_computed_whole():
    network = _Counting(torch.nn.Conv2d(3, 3, 3, padding=1))
    inputs = MetaTensor(torch.zeros(1, 3, 40, 48, 2))
    inputs[..., 5:9, 5:9, 0] = 1.0  # 40 rows: not a multiple of the grid of 16
    _cropped(inputs, network, margin=0)
    assert network.shapes == [(1, 3, 40, 48)]


def test_a_negative_slice_margin_is_refused():
    with pytest.raises(ValueError, match="slice_margin"):
        ForegroundSliceInferer(3, roi_size=(-1, -1), spatial_dim=2, slice_margin=-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_memory_applies_on_linux_and_can_be_turned_off():
    assert reuse_memory("false") is False
    assert reuse_memory(True) is True


@pytest.mark.slow
def test_inference_with_and_without_reuse_memory_writes_the_same_label_map(tmp_path):
    import nibabel as nib
    import numpy as np
    from helpers import ROOT, TINY
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import run

    from bundle.demo import make_demo_dataset

    make_demo_dataset(str(tmp_path / "data"), num_cases=1, shape=(40, 40, 24), seed=4)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"features": TINY["features"]})
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    labels = []
    for reuse in (False, True):
        out = tmp_path / f"out_{reuse}"
        run(
            config_file=str(ROOT / "configs" / "inference.json"),
            bundle_root=str(tmp_path),
            dataset_dir=str(tmp_path / "data"),
            output_dir=str(out),
            features=TINY["features"],
            num_workers=0,
            progress=False,
            reuse_memory=reuse,
        )
        labels.append(np.asarray(nib.load(str(out / "Demo_000_seg.nii.gz")).dataobj))
    assert labels[0].any()
    np.testing.assert_array_equal(labels[0], labels[1])


@pytest.mark.parametrize(
    "overrides, margin",
    [({}, 32), ({"slice_margin": 24}, 24), ({"crop_slices": False}, None), ({"crop_foreground": False}, None)],
)
def test_the_inference_config_crops_slices_on_the_cpu_unless_told_not_to(overrides, margin):
    from helpers import ROOT
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "device": "cpu", **overrides})
    inferer = parser.get_parsed_content("inferer")
    assert inferer.slice_margin == margin and inferer.slice_grid == 16
