"""The multi-scale L1 loss of SegAN (Xue et al. 2018, equations 2 and 3), and the U-net baseline's pixel-wise loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["MultiScaleL1Loss", "RegionBCEDiceLoss", "official_layer_weights", "WEIGHTING_CHOICES"]

#: Which critic layers the loss compares: the paper's multi-scale loss and its single-scale ablations
#: S3-3C-s0 (the masked input only) and S3-3C-s3 (the last critic layer only), section 3.1.
LAYER_CHOICES = ("all", "first", "last")

#: How the selected layers' errors are weighed into one critic's loss (``MultiScaleL1Loss(weighting=...)``).
WEIGHTING_CHOICES = ("mean", "sum", "official", "balanced")


def official_layer_weights(num_layers: int) -> list[float]:
    """Layer weights of the authors' public SegAN code (Xue et al. 2018): 1 for the masked input and the first
    convolution, 4 for the deepest layer, 2 in between (1, 1, 2, 2, 2, 2, 4 for their six-layer critic)."""
    if num_layers < 1:
        raise ValueError(f"need at least one layer, got {num_layers}.")
    weights = [1.0 if i < 2 else 2.0 for i in range(num_layers)]
    if num_layers > 1:
        weights[-1] = 4.0
    return weights


class MultiScaleL1Loss(nn.Module):
    """``l_mae`` of equation (3) of Xue et al. 2018, averaged over critics.

    For one critic with feature lists ``f`` (prediction-masked input) and ``g`` (ground-truth-masked input), the
    loss is ``sum_i w_i e_i`` with ``e_i = mean|f_i - g_i|`` the mean absolute error of selected layer ``i``
    (the batch mean is the ``1/N sum_n`` of equation 2) and the weights ``w_i`` set by ``weighting``:

    * ``"mean"``: ``w_i = 1/L``; layers of any size weigh the same. Measured on the demo, the deepest layer
      then carries most of the loss, because its features are the largest;
    * ``"sum"``: the ``||.||_1`` of equation (3) over all layers' features together, scaled to a mean:
      ``w_i = n_i / sum_j n_j`` with ``n_i`` the layer's feature count per sample, so large (shallow) layers
      weigh most;
    * ``"official"``: the authors' public code, one mean over the concatenated features each multiplied by a
      layer weight ``c_i`` (:func:`official_layer_weights`): ``w_i = c_i n_i / sum_j n_j``;
    * ``"balanced"``: ``w_i = 1 / (L s_i)``, with ``s_i`` a running estimate (exponential moving average,
      ``momentum``, no gradient through it) of the layer's error ``e_i``: every layer carries about ``1/L``
      of the loss, so the loss stays multi-scale whatever the layers' magnitudes. The estimate is updated in
      training mode only, and is not part of a checkpoint (it re-converges in a few iterations on resume).

    With several critics (the paper's S3-3C) the result is the average of their losses.

    Args:
        layers: ``"all"`` (the paper's multi-scale loss), ``"first"`` (layer 0, S3-3C-s0), ``"last"``
            (the deepest layer, S3-3C-s3), or an explicit sequence of layer indices.
        weighting: one of ``WEIGHTING_CHOICES``.
        momentum: the running estimate's momentum for ``"balanced"``.
    """

    def __init__(self, layers: str | Sequence[int] = "all", weighting: str = "mean", momentum: float = 0.99) -> None:
        super().__init__()
        if isinstance(layers, str) and layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {LAYER_CHOICES} or a list of layer indices, got {layers!r}.")
        if weighting not in WEIGHTING_CHOICES:
            raise ValueError(f"loss_weighting must be one of {WEIGHTING_CHOICES}, got {weighting!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.layers = layers
        self.weighting = weighting
        self.momentum = float(momentum)
        self.register_buffer("scale", torch.zeros(0), persistent=False)

    def _select(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.layers == "all":
            return list(feats)
        if self.layers == "first":
            return [feats[0]]
        if self.layers == "last":
            return [feats[-1]]
        return [feats[i] for i in self.layers]

    def layer_errors(self, pred_feats: Sequence[torch.Tensor], true_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``e_i = mean|f_i - g_i|`` of one critic's selected layers ``i``, in float32."""
        if len(pred_feats) != len(true_feats):
            raise ValueError(f"feature lists differ in length: {len(pred_feats)} vs {len(true_feats)}.")
        pairs = zip(self._select(pred_feats), self._select(true_feats))
        return torch.stack([torch.mean(torch.abs(f.float() - g.float())) for f, g in pairs])

    def layer_weights(self, feats: Sequence[torch.Tensor], errors: torch.Tensor) -> torch.Tensor:
        """``w_i`` of every critic's selected layers, shape of ``errors`` (critics, layers); see the class doc."""
        sizes = torch.tensor([f[0].numel() for f in self._select(feats)], dtype=torch.float32, device=errors.device)
        count = errors.shape[-1]
        if self.weighting == "mean":
            weights = torch.full_like(sizes, 1.0 / count)
        elif self.weighting == "sum":
            weights = sizes / sizes.sum()
        elif self.weighting == "official":
            selected = self._select(list(range(len(feats))))
            all_weights = official_layer_weights(len(feats))
            factors = torch.tensor([all_weights[i] for i in selected], dtype=torch.float32, device=errors.device)
            weights = factors * sizes / sizes.sum()
        else:
            return 1.0 / (count * self._running_scale(errors))
        return weights.expand_as(errors)

    def _running_scale(self, errors: torch.Tensor) -> torch.Tensor:
        """The running estimate ``s_i`` of each (critic, layer)'s error, updated from ``errors`` when training."""
        current = errors.detach().float().clamp_min(1e-8)
        if self.scale.shape != current.shape:
            self.scale = current.clone()  # first call (or another layer set): start at the observed errors
        elif self.training:
            self.scale = self.momentum * self.scale + (1.0 - self.momentum) * current
        return self.scale

    def single(self, pred_feats: Sequence[torch.Tensor], true_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Equation (3) for one critic."""
        return self.terms([pred_feats], [true_feats]).sum()

    def terms(
        self, pred_feats: Sequence[Sequence[torch.Tensor]], true_feats: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Each (critic, layer)'s contribution ``w_i e_i / critics`` to the loss, shape (critics, selected
        layers), summing to it.

        What share of the loss each critic layer carries shows whether the loss is multi-scale at all: layer 0
        (the masked input) has no trainable part, so a loss carried by it alone is an intensity-weighted L1,
        and one carried by the deepest layer alone is the single-scale S3-3C-s3.
        """
        if len(pred_feats) != len(true_feats) or not pred_feats:
            raise ValueError(
                f"expected one feature list per critic on both sides, got {len(pred_feats)} and {len(true_feats)}."
            )
        errors = torch.stack([self.layer_errors(f, g) for f, g in zip(pred_feats, true_feats)])
        return self.layer_weights(pred_feats[0], errors) * errors / errors.shape[0]

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
