"""The segmentor and critic follow the paper's Fig. 1."""

import pytest
import torch
from helpers import ROOT
from torch import nn

from bundle.losses import MultiScaleL1Loss
from bundle.networks import SegANCritic, SegANCritics, SegANSegmentor, critic_view, mask_image

SMALL = (4, 8, 16, 32)


@pytest.mark.parametrize("skip", ["add", "cat"])
@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_segmentor_maps_each_pixel_to_one_logit_per_region(skip, upsample):
    net = SegANSegmentor(in_channels=3, out_channels=3, features=SMALL, skip=skip, upsample=upsample)
    out = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 3, 32, 48)


def test_segmentor_has_four_stride_two_4x4_encoder_blocks_first_without_batchnorm():
    net = SegANSegmentor()
    convs = [next(m for m in block.modules() if isinstance(m, nn.Conv2d)) for block in net.encoder]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    has_bn = [any(isinstance(m, nn.BatchNorm2d) for m in block.modules()) for block in net.encoder]
    assert has_bn == [False, True, True, True]
    assert all(any(isinstance(m, nn.LeakyReLU) for m in block.modules()) for block in net.encoder)


def test_segmentor_decoder_resizes_then_3x3_convs_down_to_the_region_maps():
    net = SegANSegmentor(out_channels=2)
    convs = [m for m in net.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 128, 64]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    head = [m for m in net.head.modules() if isinstance(m, nn.Conv2d)]
    assert len(head) == 1 and head[0].out_channels == 2


def test_cat_skips_concatenate_the_matching_encoder_level_by_default():
    net = SegANSegmentor(features=SMALL).eval()  # the paper's U-net skips (section 2.2)
    seen = {}
    net.encoder[0].register_forward_hook(lambda m, i, o: seen.setdefault("enc", o))
    net.head.register_forward_pre_hook(lambda m, i: seen.setdefault("head_in", i[0]))
    net.decoder[-1].register_forward_hook(lambda m, i, o: seen.setdefault("dec", o))
    net(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(seen["head_in"], torch.cat([seen["dec"], seen["enc"]], dim=1))


def test_add_skips_sum_the_matching_encoder_level():
    net = SegANSegmentor(features=SMALL, skip="add").eval()
    seen = {}
    net.encoder[0].register_forward_hook(lambda m, i, o: seen.setdefault("enc", o))
    net.head.register_forward_pre_hook(lambda m, i: seen.setdefault("head_in", i[0]))
    net.decoder[-1].register_forward_hook(lambda m, i, o: seen.setdefault("dec", o))
    net(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(seen["head_in"], seen["dec"] + seen["enc"])


def test_segmentor_rejects_sizes_that_are_not_multiples_of_16():
    net = SegANSegmentor(features=SMALL)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 3, 40, 32))


def test_critic_returns_masked_input_and_each_block_output():
    critic = SegANCritic(in_channels=3, features=(4, 8, 16))
    feats = critic(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 3 * 32 * 32), (2, 4 * 16 * 16), (2, 8 * 8 * 8), (2, 16 * 4 * 4)]


def test_masking_multiplies_every_channel_by_every_map():
    image = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).reshape(2, 3, 2, 2)
    maps = torch.rand(2, 4, 2, 2)
    masked = mask_image(image, maps)
    assert masked.shape == (2, 4, 3, 2, 2)
    torch.testing.assert_close(masked[1, 2, 0], image[1, 0] * maps[1, 2])


def test_s3_3c_has_one_critic_per_region_and_s3_1c_one_joint_critic():
    image, maps = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    per_region = SegANCritics(in_channels=3, num_regions=3, features=(4, 8, 16))
    feats = per_region(image, maps)
    assert len(feats) == 3 and len(feats[0]) == 4
    torch.testing.assert_close(feats[1][0], (image * maps[:, 1:2]).flatten(1))
    joint = SegANCritics(in_channels=3, num_regions=3, features=(4, 8, 16), mode="joint")
    feats = joint(image, maps)
    assert len(feats) == 1 and feats[0][0].shape == (2, 9 * 32 * 32)


def test_clamp_keeps_every_critic_weight_in_range():
    critics = SegANCritics(in_channels=2, num_regions=2, features=(4, 8, 16))
    critics.clamp_(0.01)
    assert all(p.abs().max() <= 0.01 for p in critics.parameters())


def test_segmentor_scripts_to_torchscript_with_the_same_output():
    net = SegANSegmentor(features=SMALL).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(scripted(x), net(x))
    with pytest.raises(Exception, match="multiples of 16"):
        scripted(torch.randn(1, 3, 40, 32))


def test_bundle_exports_the_trained_segmentor_to_torchscript(tmp_path):
    from monai.bundle.scripts import ckpt_export

    net = SegANSegmentor(features=SMALL).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        config_file=str(ROOT / "configs" / "inference.json"),
        features=list(SMALL),
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(exported(x), net(x))


def _prediction_gradient(input_mode, critic_mode="per_region"):
    """d(multi-scale loss)/d(prediction) for an image that is 0 in its left half (the air normalisation zeroes)."""
    torch.manual_seed(0)
    image = torch.rand(2, 3, 16, 16) + 0.5
    image[..., :8] = 0
    label = torch.zeros(2, 2, 16, 16)
    label[:, :, 4:12, 8:12] = 1
    pred = torch.rand(2, 2, 16, 16, requires_grad=True)
    critics = SegANCritics(in_channels=3, num_regions=2, features=(4, 8, 16), mode=critic_mode, input_mode=input_mode)
    MultiScaleL1Loss()(critics(image, pred), critics(image, label)).backward()
    return pred.grad


@pytest.mark.parametrize("critic_mode", ["per_region", "joint"])
def test_the_literal_masked_input_gives_no_gradient_to_predictions_where_the_image_is_zero(critic_mode):
    grad = _prediction_gradient("masked", critic_mode)
    assert torch.count_nonzero(grad[..., :8]) == 0  # whatever S paints in the air, the loss cannot see it
    assert torch.count_nonzero(grad[..., 8:]) > 0


@pytest.mark.parametrize("input_mode", ["masked_map", "shifted"])
@pytest.mark.parametrize("critic_mode", ["per_region", "joint"])
def test_critic_inputs_that_see_every_prediction_give_it_a_gradient_in_the_air(input_mode, critic_mode):
    grad = _prediction_gradient(input_mode, critic_mode)
    assert (grad[..., :8].abs().flatten(2).amax(-1) > 0).all()  # every sample and region, in the zero half


def test_critic_views_have_the_expected_channels_and_values():
    image = torch.tensor([[[[0.0, -2.0], [1.0, 3.0]]]])  # (1, 1, 2, 2)
    maps = torch.tensor([[[[1.0, 0.5], [0.0, 1.0]]]])
    torch.testing.assert_close(critic_view(image, maps, "masked"), mask_image(image, maps))
    both = critic_view(image, maps, "masked_map")
    assert both.shape == (1, 1, 2, 2, 2)
    torch.testing.assert_close(both[:, 0, 1], maps[:, 0])
    shifted = critic_view(image, maps, "shifted")  # min -2 -> 1: values 3, 1, 4, 6 before masking
    torch.testing.assert_close(shifted[0, 0, 0], torch.tensor([[3.0, 0.5], [0.0, 6.0]]))
    with pytest.raises(ValueError, match="critic_input"):
        SegANCritics(input_mode="raw")
