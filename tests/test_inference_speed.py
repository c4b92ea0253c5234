"""Inference time (issue 19, item 1): the direct slice path and the allocator setting change how fast, not what.

The claims: ``ForegroundSliceInferer`` over whole slices gives MONAI's ``SliceInferer`` result bit for bit (any
batch size, several cases, NHWC weights, autocast), returns a normal tensor carrying the input's metadata, and
leaves other settings to ``SliceInferer``; ``reuse_memory`` leaves the written label map unchanged.
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
