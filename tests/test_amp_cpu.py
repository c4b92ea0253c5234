"""GPU numerics on the CPU: every trainer, built from its configs with the configs' own ``amp`` and ``amp_dtype``
keys, runs its networks under bfloat16 autocast and keeps the probability maps and losses in float32.

On a GPU ``amp`` autocasts (bfloat16 where supported); this is the same path on a CPU, which PyTorch allows
for bfloat16. The gradient scaler, channels_last kernels and cuDNN need a GPU: ``scripts/gpu_check.py``.
"""

import pytest
import torch
from helpers import ROOT, TINY
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle.demo import make_demo_dataset

CONFIGS = ROOT / "configs"
MOESKOPS = [str(CONFIGS / "moeskops" / f"{n}.json") for n in ("multiclass", "dilated", "adversarial")]
#: Every trainer and input a user trains, as its overlays.
TRAINERS = {
    "S3-3C": [],
    "S3-1C": [str(CONFIGS / "variants" / "s3_1c.json")],
    "S1-1C": [str(CONFIGS / "variants" / "s1_1c.json")],
    "2.5D": [str(CONFIGS / "variants" / "context_2_5d.json")],
    "U-net": [str(CONFIGS / "variants" / "unet.json")],
    "Moeskops": MOESKOPS,
}
FLOAT_OUTPUTS = ("loss", "adversarial_loss", "critic_loss", "discriminator_loss")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amp") / "demo"
    make_demo_dataset(str(folder), num_cases=4, shape=(40, 36, 24), seed=3)
    return folder


def _first_conv(module):
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_autocasts_its_networks_to_bfloat16_and_keeps_the_game_in_float32(name, data, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), *TRAINERS[name]])
    overrides = {
        **TINY,
        "bundle_root": str(tmp_path),
        "dataset_dir": str(data),
        "amp": "true",
        "amp_dtype": "bfloat16",
        "progress": False,
        "tensorboard": False,
    }
    if name == "Moeskops":
        overrides.update({"network_def#features": 4, "discriminator_features": 4, "discriminator_hidden": 8})
    parser.update(overrides)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.amp is True
    dtypes = {}
    networks = {"segmentor": parser.get_parsed_content("network")}
    if parser.get_parsed_content("critic") is not None:
        networks["critic"] = parser.get_parsed_content("critic")
    for role, network in networks.items():
        _first_conv(network).register_forward_hook(
            lambda m, i, out, role=role: dtypes.setdefault(role, out.dtype) and None
        )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: engine.terminate())
    trainer.run()

    assert dtypes == {role: torch.bfloat16 for role in networks}
    output = trainer.state.output
    output = output[0] if isinstance(output, list) else output
    assert output["pred"].dtype == torch.float32
    for key in FLOAT_OUTPUTS:
        if key in output:
            assert output[key].dtype == torch.float32 and torch.isfinite(output[key]).all(), key
