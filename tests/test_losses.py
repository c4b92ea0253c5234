"""The multi-scale L1 loss is equation (3), averaged over the critics."""

import pytest
import torch

from bundle.losses import MultiScaleL1Loss

# one critic, two layers: layer 0 MAE = (1 + 0) / 2, layer 1 MAE = (1 + 1 + 2) / 3
F = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0, 3.0]])]
G = [torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0]])]


def test_multi_scale_loss_averages_the_mean_absolute_error_of_every_layer():
    loss = MultiScaleL1Loss()([F], [G])
    assert loss.item() == pytest.approx((0.5 + 4 / 3) / 2)


@pytest.mark.parametrize("layers, expected", [("first", 0.5), ("last", 4 / 3), ([1], 4 / 3), ([0, 1], (0.5 + 4 / 3) / 2)])
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
