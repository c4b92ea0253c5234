"""The multi-scale L1 loss of SegAN (Xue et al. 2018, equations 2 and 3), and the U-net baseline's pixel-wise loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["MultiScaleL1Loss", "RegionBCEDiceLoss"]

#: Which critic layers the loss compares: the paper's multi-scale loss and its single-scale ablations
#: S3-3C-s0 (the masked input only) and S3-3C-s3 (the last critic layer only), section 3.1.
LAYER_CHOICES = ("all", "first", "last")


class MultiScaleL1Loss(nn.Module):
    """``l_mae`` of equation (3), averaged over critics.

    For one critic with feature lists ``f`` (prediction-masked input) and ``g`` (ground-truth-masked input),
    the loss is ``1/L sum_i mean|f_i - g_i|`` over the selected layers ``i``: the mean absolute error of each
    layer, so layers of different sizes weigh the same. The batch mean is the ``1/N sum_n`` of equation (2).
    With several critics (the paper's S3-3C) the result is the average of their losses.

    Args:
        layers: ``"all"`` (the paper's multi-scale loss), ``"first"`` (layer 0, S3-3C-s0), ``"last"``
            (the deepest layer, S3-3C-s3), or an explicit sequence of layer indices.
    """

    def __init__(self, layers: str | Sequence[int] = "all") -> None:
        super().__init__()
        if isinstance(layers, str) and layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {LAYER_CHOICES} or a list of layer indices, got {layers!r}.")
        self.layers = layers

    def _select(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.layers == "all":
            return list(feats)
        if self.layers == "first":
            return [feats[0]]
        if self.layers == "last":
            return [feats[-1]]
        return [feats[i] for i in self.layers]

    def layer_errors(self, pred_feats: Sequence[torch.Tensor], true_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``mean|f_i - g_i|`` of one critic's selected layers ``i``: the terms that equation (3) averages."""
        if len(pred_feats) != len(true_feats):
            raise ValueError(f"feature lists differ in length: {len(pred_feats)} vs {len(true_feats)}.")
        pairs = zip(self._select(pred_feats), self._select(true_feats))
        return torch.stack([torch.mean(torch.abs(f.float() - g.float())) for f, g in pairs])

    def single(self, pred_feats: Sequence[torch.Tensor], true_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Equation (3) for one critic."""
        return self.layer_errors(pred_feats, true_feats).mean()

    def terms(
        self, pred_feats: Sequence[Sequence[torch.Tensor]], true_feats: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Each (critic, layer)'s contribution to the loss, shape (critics, selected layers), summing to it.

        What share of the loss each critic layer carries shows whether the adversarial part is alive: layer 0
        (the masked input) has no trainable part, so a loss carried by it alone is an intensity-weighted L1.
        """
        if len(pred_feats) != len(true_feats) or not pred_feats:
            raise ValueError(f"expected one feature list per critic on both sides, got {len(pred_feats)} and {len(true_feats)}.")
        errors = torch.stack([self.layer_errors(f, g) for f, g in zip(pred_feats, true_feats)])
        return errors / errors.numel()

    def forward(
        self, pred_feats: Sequence[Sequence[torch.Tensor]], true_feats: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Average of equation (3) over the critics; each argument holds one feature list per critic."""
        return self.terms(pred_feats, true_feats).sum()


class RegionBCEDiceLoss(nn.Module):
    """The pixel-wise loss of the U-net baseline (paper Table 1): the same segmentor without any critic.

    The paper's baseline uses softmax cross-entropy over exclusive classes; the bundle's regions overlap
    (whole tumour contains core contains enhancing), so each region map gets its own binary cross-entropy
    on the logits, averaged over regions and pixels. ``dice_weight`` adds a soft Dice term on the
    sigmoid probabilities, as the adversarial trainer's ``dice_weight`` does (0 = cross-entropy only).
    """

    def __init__(self, dice_weight: float = 0.0) -> None:
        super().__init__()
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}.")
        self.dice_weight = float(dice_weight)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits.float(), target.float())
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits.float(), target.float())
        return loss
