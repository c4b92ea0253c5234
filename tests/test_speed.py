"""Speed options change how fast, not what: each runs one training iteration and one inference on a CPU and
gives the default's result (docs/performance.md has what each one buys). Mixed precision really autocasts on a
CPU (bfloat16 / float16 networks, float32 losses), so it gives the default's result within its rounding: the
weights within a few learning-rate steps, and the label maps on all but a few voxels."""

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.demo import make_demo_dataset

#: Options that change the arithmetic: (weight tolerance, fraction of label voxels that may differ). RMSProp's
#: first step moves a weight by lr / sqrt(1 - alpha) = 2e-4 either way, so a gradient whose sign the rounding
#: flips leaves that weight 4e-4 from the default's.
REDUCED_PRECISION = {"amp_float16": (5e-4, 0.01), "amp_bfloat16": (5e-4, 0.01)}
OPTIONS = {
    "channels_last": {"channels_last": True},
    "compile": {"compile": "eager"},  # dynamo traces the networks; inductor's C++ build takes minutes on a CPU
    "amp_float16": {"amp": True, "amp_dtype": "float16"},  # on a CPU: the gradient scaler's path
    "amp_bfloat16": {"amp": True, "amp_dtype": "bfloat16"},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "pinned_workers": {"num_workers": 1, "pin_memory": True},
    "sw_batch_size": {"sw_batch_size": 1},
}


def _one_training_iteration(**options):
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": (torch.rand(2, 3, 32, 32) > 0.5).float()}
    parser = ConfigParser(globals={"monai": "monai", "torch": "torch", "numpy": "numpy", "batches": [batch]})
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(ROOT),
            **TINY,
            **options,
            "device": "$torch.device('cpu')",
            "train#trainer#train_data_loader": "$batches",
            "train#trainer#train_handlers": [],
            "train#trainer#max_epochs": 1,
        }
    )
    parser.get_parsed_content("initialize")  # determinism, then cudnn_benchmark
    torch.manual_seed(1)  # the same initial weights for every option
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}, trainer.state.output


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    make_demo_dataset(str(root / "data"), num_cases=1, shape=(40, 40, 24), seed=4)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"features": TINY["features"]})
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


def _infer(root, out, **options):
    settings = {"features": TINY["features"], "num_workers": 0, "progress": False, **options}
    run(
        config_file=str(ROOT / "configs" / "inference.json"),
        bundle_root=str(root),
        dataset_dir=str(root / "data"),
        output_dir=str(out),
        **settings,
    )
    return np.asarray(nib.load(str(out / "Demo_000_seg.nii.gz")).dataobj)


@pytest.fixture(scope="module")
def defaults(case, tmp_path_factory):
    return _one_training_iteration(), _infer(case, tmp_path_factory.mktemp("default"))


# compile is slow (dynamo traces the networks for seconds); each other option runs in under a second
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "compile" else n for n in OPTIONS])
def test_a_speed_option_trains_and_infers_like_the_default(name, case, defaults, tmp_path):
    (weights, output), labels = defaults
    option_weights, option_output = _one_training_iteration(**OPTIONS[name])
    assert torch.isfinite(option_output["loss"]) and torch.isfinite(option_output["critic_loss"])
    assert option_weights.keys() == weights.keys()  # a compiled network keeps its checkpoint keys
    atol, mismatch = REDUCED_PRECISION.get(name, (1e-5, 0.0))
    for key, value in weights.items():
        torch.testing.assert_close(option_weights[key], value, rtol=1e-4, atol=atol, msg=key)
    option_labels = _infer(case, tmp_path, **OPTIONS[name])
    assert option_labels.any()
    if mismatch:
        assert np.mean(option_labels != labels) <= mismatch
    else:
        np.testing.assert_array_equal(option_labels, labels)
