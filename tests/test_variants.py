"""The paper's multi-label variants (section 3.1) and the U-net baseline (Table 1), each a config overlay."""

import os

import pytest
import torch
from helpers import ROOT, TINY
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.bundle.scripts import run

from bundle.losses import MultiScaleL1Loss
from bundle.networks import RegionSegmentors, SegANCritics

TRAIN = os.path.join(ROOT, "configs", "train.json")
VARIANTS = ("s1_1c", "s3_1c", "s3_3c", "s3_3c_s0", "s3_3c_s3", "unet", "context_2_5d")
INFERENCE = os.path.join(ROOT, "configs", "inference.json")


def _overlay(name):
    return os.path.join(ROOT, "configs", "variants", f"{name}.json")


def _parser(*overlays, **overrides):
    parser = ConfigParser()
    parser.read_config([TRAIN, *(_overlay(o) for o in overlays)])
    parser.update({**TINY, **overrides})
    return parser


def _critic_inputs(critics: SegANCritics) -> list[int]:
    return [critic.blocks[0].conv.in_channels for critic in critics.critics]


@pytest.mark.parametrize(
    "overlay, inputs",
    [
        ("s3_3c", [3, 3, 3]),  # one critic per region, each sees the 3 modalities masked by its map
        ("s3_3c_s0", [3, 3, 3]),
        ("s3_3c_s3", [3, 3, 3]),
        ("s1_1c", [3, 3, 3]),
        ("s3_1c", [9]),  # one critic on the 3 masked images concatenated
        ("context_2_5d", [9, 9, 9]),  # 2.5D: every modality at slices z-1, z, z+1
    ],
)
def test_critic_input_channels_per_variant(overlay, inputs):
    assert _critic_inputs(_parser(overlay).get_parsed_content("critic_def")) == inputs


def test_unet_baseline_has_no_critic():
    parser = _parser("unet")
    assert parser.get_parsed_content("critic") is None and parser.get_parsed_content("critic_optimizer") is None
    assert parser.get_parsed_content("critic_lr_scheduler") is None  # its handler is off; the state saves no critic


def test_s1_1c_is_one_single_map_segmentor_per_region():
    net = _parser("s1_1c").get_parsed_content("network_def")
    assert isinstance(net, RegionSegmentors) and len(net.segmentors) == 3
    assert all(s.head[1].conv.out_channels == 1 for s in net.segmentors)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("region", [0, 1, 2])
def test_s1_1c_gradient_from_region_r_reaches_only_segmentor_r(region):
    torch.manual_seed(0)
    net = RegionSegmentors(in_channels=3, out_channels=3, features=(4, 8, 16, 32))
    critics = SegANCritics(in_channels=3, num_regions=3, features=(4, 8, 16))
    image, label = torch.randn(2, 3, 32, 32), (torch.rand(2, 3, 32, 32) > 0.5).float()
    pred = torch.sigmoid(net(image))
    # region r's term of the averaged multi-scale loss: critic r on x o S(x)_r against x o y_r
    loss = MultiScaleL1Loss().single(critics(image, pred)[region], critics(image, label)[region])
    loss.backward()
    for r, segmentor in enumerate(net.segmentors):
        reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in segmentor.parameters())
        assert reached == (r == region)


def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 3, 32, 32, generator=g)
    label = torch.zeros(8, 3, 32, 32)
    label[:, 0, 8:24, 8:24] = 1
    label[:, 1, 12:20, 12:20] = 1
    label[:, 2, 14:18, 14:18] = 1
    image[:, :, 8:24, 8:24] += 1.0  # the "tumour" is brighter
    return {"image": image, "label": label}


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_unet_baseline_lowers_its_loss_on_a_fixed_batch(dice_weight):
    parser = _parser("unet", dice_weight=dice_weight, learning_rate=0.01)
    parser["optimizer"] = {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"}
    parser["train#handlers"] = []
    parser["train#dataloader"] = "$[@fixed_batch] * 20"
    parser["fixed_batch"] = _fixed_batch()
    parser["device"] = "cpu"
    trainer = parser.get_parsed_content("train#trainer")
    assert type(trainer).__name__ == "AutocastSupervisedTrainer"
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_through_monai_bundle_run(variant, tmp_path, demo_dir):
    run(
        "training",
        config_file=[TRAIN, _overlay(variant)],
        bundle_root=str(tmp_path),
        dataset_dir=str(demo_dir),
        **{**TINY, "max_epochs": 1},
    )
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    parser = _parser(variant)
    parser.get_parsed_content("network_def").load_state_dict(weights)
    assert (tmp_path / "checkpoints" / "training_state.pt").is_file()


def test_context_slices_stack_every_modalitys_neighbours_as_channels():
    from bundle.transforms import ContextSlicesd

    depth = 5
    z = torch.arange(depth, dtype=torch.float32)
    volume = torch.stack([100 * m + z.expand(4, 4, depth) for m in range(2)])  # value = 100 * modality + slice
    out = ContextSlicesd("image", context_slices=1)({"image": volume})["image"]
    assert out.shape == (2 * 3, 4, 4, depth)
    for j, offset in enumerate((-1, 0, 1)):
        for m in range(2):
            expected = 100 * m + (z + offset).clamp(0, depth - 1)  # beyond the ends: the edge slice again
            torch.testing.assert_close(out[j * 2 + m, 0, 0], expected)
    assert ContextSlicesd("image", context_slices=0)({"image": volume})["image"] is volume


def test_2_5d_segmentor_takes_every_modality_at_2k_plus_1_slices():
    for k in (1, 2):
        net = _parser("context_2_5d", context_slices=k).get_parsed_content("network_def")
        assert net.encoder[0].conv.in_channels == 3 * (2 * k + 1)


def test_2_5d_inference_feeds_the_neighbours_training_fed(demo_dir):
    """The volume training cuts its slices from, context channels included, is the one inference slides over."""
    from monai.data import Dataset
    from monai.transforms import Compose

    from bundle.datalist import load_datalist

    case = load_datalist("", str(demo_dir), "training")[0]
    settings = {**TINY, "context_slices": 1, "dataset_dir": str(demo_dir), "slices_per_volume": 6}
    train = _parser("context_2_5d", **settings)
    parser = ConfigParser()
    parser.read_config([INFERENCE, _overlay("context_2_5d")])
    parser.update({**settings, "spatial_fit": "crop"})  # the same field of view, so the same normalisation
    volume = parser.get_parsed_content("preprocessing")({"image": case["image"]})["image"].as_tensor()
    assert volume.shape == (9, 32, 32, TINY["crop_size"][-1])  # the depth crop keeps 12 of the 24 slices

    # every slice, the crop's first and last included: their outer neighbours are real slices in both
    cached = Compose(train.get_parsed_content("load_transforms"))(case)["image"].as_tensor()
    torch.testing.assert_close(cached, volume, atol=1e-5, rtol=1e-5)
    assert not torch.equal(volume[0:3, ..., 0], volume[3:6, ..., 0])  # not the edge slice repeated
    for sample in Dataset([case], train.get_parsed_content("train#preprocessing"))[0]:
        image = sample["image"]
        assert image.shape == (9, 32, 32)
        assert any(torch.allclose(image, volume[..., z], atol=1e-5) for z in range(volume.shape[-1]))
