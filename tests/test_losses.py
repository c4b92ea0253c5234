"""The multi-scale L1 loss is equation (3), averaged over the critics."""

import pytest
import torch

from bundle.losses import WEIGHTING_CHOICES, MultiScaleL1Loss, official_layer_weights

# one critic, two layers: layer 0 MAE = (1 + 0) / 2, layer 1 MAE = (1 + 1 + 2) / 3
F = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0, 3.0]])]
G = [torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0]])]


def test_multi_scale_loss_averages_the_mean_absolute_error_of_every_layer():
    loss = MultiScaleL1Loss()([F], [G])
    assert loss.item() == pytest.approx((0.5 + 4 / 3) / 2)


@pytest.mark.parametrize(
    "layers, expected", [("first", 0.5), ("last", 4 / 3), ([1], 4 / 3), ([0, 1], (0.5 + 4 / 3) / 2)]
)
def test_layer_selection_gives_the_single_scale_ablations(layers, expected):
    assert MultiScaleL1Loss(layers)([F], [G]).item() == pytest.approx(expected)


def test_several_critics_average_their_losses():
    same = [torch.zeros(1, 2), torch.zeros(1, 3)]
    loss = MultiScaleL1Loss()([F, same], [G, same])
    assert loss.item() == pytest.approx((0.5 + 4 / 3) / 4)


def test_batch_mean_is_the_mean_over_samples():
    f = [torch.tensor([[1.0], [3.0]])]
    g = [torch.tensor([[0.0], [0.0]])]
    assert MultiScaleL1Loss()([f], [g]).item() == pytest.approx(2.0)


def test_unknown_layer_choice_is_rejected():
    with pytest.raises(ValueError, match="layers must be"):
        MultiScaleL1Loss("middle")


# Layer weighting (loss_weighting): the same two layers, sizes 2 and 3, errors 0.5 and 4/3.
@pytest.mark.parametrize(
    "weighting, expected",
    [
        ("mean", (0.5 + 4 / 3) / 2),  # each layer's mean, averaged
        ("sum", (1 + 0 + 1 + 1 + 2) / 5),  # equation (3)'s ||.||_1 over all features, as a mean
        ("official", (1 * (1 + 0) + 4 * (1 + 1 + 2)) / 5),  # the authors' code: mean of concat(1 * d0, 4 * d1)
        ("balanced", 1.0),  # first call: each layer divided by its own error, 1/L each
    ],
)
def test_each_layer_weighting_matches_a_hand_computation(weighting, expected):
    assert MultiScaleL1Loss(weighting=weighting)([F], [G]).item() == pytest.approx(expected)


def test_official_weights_are_the_authors_for_their_six_layer_critic():
    assert official_layer_weights(7) == [1, 1, 2, 2, 2, 2, 4]
    assert official_layer_weights(4) == [1, 1, 2, 4]


def test_balanced_weighting_keeps_every_layer_share_near_equal_as_magnitudes_drift():
    loss = MultiScaleL1Loss(weighting="balanced", momentum=0.5).train()
    loss([F], [G])
    bigger = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0, 30.0]])]  # layer 1's error x ~7
    for _ in range(20):
        terms = loss.terms([bigger], [G])
    shares = terms / terms.sum()
    assert torch.allclose(shares, torch.full_like(shares, 0.5), atol=1e-3)
    scale = loss.scale.clone()
    loss.eval()([F], [G])  # evaluation does not move the running estimate
    assert torch.equal(loss.scale, scale)
    assert loss.scale.grad_fn is None


def test_per_layer_shares_sum_to_one_loss_under_every_weighting():
    for weighting in WEIGHTING_CHOICES:
        loss = MultiScaleL1Loss(weighting=weighting)
        terms = loss.terms([F, F], [G, G])
        assert terms.shape == (2, 2)
        assert terms.sum().item() == pytest.approx(loss([F, F], [G, G]).item())


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="loss_weighting must be"):
        MultiScaleL1Loss(weighting="max")
