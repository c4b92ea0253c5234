"""Lesion-wise Dice and HD95 as the BraTS challenges since 2023 rank them, computed by ``panoptica``.

A case-wise Dice hides a missed small lesion behind a well-segmented large one. BraTS 2023 therefore scores
every lesion on its own: each region map is split into 3D connected components (26-neighbourhood), predicted
components are matched to reference components, and each reference lesion contributes its own Dice and HD95.
The official BraTS evaluation package (``BraTS_evaluation``, a thin layer over ``panoptica``) matches with
``panoptica``'s ``MaxBipartiteMatching`` on Dice above 1e-6 (one-to-one, maximising the total Dice); this
module runs ``panoptica`` with that same configuration on each region of the written label map, so the numbers
are the official ones, not a re-implementation.

Per case and region it reports (the names are suffixes of the handler's name, e.g. ``lesion_dice``):

- ``dice`` / ``hd95``: the BraTS 2023 aggregation, the mean over matched lesions, unmatched reference lesions
  (false negatives, Dice 0 and HD95 ``empty_score``) and unmatched predicted lesions (false positives, the
  same), i.e. ``(sum of matched Dice) / (tp + fn + fp)``; both maps empty scores 1 and 0.
- ``dice_matched`` / ``hd95_matched``: the official package's ``lesionwise_dsc_mean`` / ``lesionwise_hd95_mean``
  (``panoptica``'s ``sq_dsc`` / ``sq_hd95``), the mean over matched lesions only; no match but some lesion
  scores 0 and ``empty_score``; no lesion at all is NaN (left out of the mean, as in the package).
- ``tp``, ``fp``, ``fn``: matched, unmatched predicted and unmatched reference lesions (detection F1 is
  ``2 tp / (2 tp + fp + fn)``).

BraTS 2023's original script also merged reference lesions closer than a dilation and ignored lesions below a
volume threshold; the 2024+ package (and this module) does neither.

``panoptica`` is an optional dependency (``pip install "segan-bundle[lesionwise]"``); it is imported when a
metric is built, so an evaluation that asks for lesion-wise scores without it fails at once, saying what to install.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.utils import MetricReduction, convert_to_numpy

from .metrics import BRATS_EMPTY_HD95, RegionMetric

__all__ = ["LESION_QUANTITIES", "lesion_evaluator", "lesion_wise_scores", "LesionWiseMetric", "LesionWise"]

#: what :func:`lesion_wise_scores` returns per region, in the order of the last axis of the metric's buffer
LESION_QUANTITIES = ("dice", "hd95", "dice_matched", "hd95_matched", "tp", "fp", "fn")

_INSTALL_HINT = (
    "lesion-wise metrics are computed by the optional package 'panoptica': install it with "
    '`pip install "segan-bundle[lesionwise]"` (or `pip install panoptica`), or run the evaluation without '
    "them (--lesion_wise false)."
)


def lesion_evaluator() -> Any:
    """A ``panoptica.Panoptica_Evaluator`` configured as the official BraTS evaluation package's glioma config.

    Binary (semantic) input, instances from connected components (``panoptica``'s defaults: the
    26-neighbourhood in 3D, the 4-neighbourhood in 2D), one-to-one maximum bipartite matching on Dice > 1e-6, Dice and
    HD95 per instance.

    Raises:
        ImportError: ``panoptica`` is not installed; the message says how to install it.
    """
    try:
        from panoptica import (
            ConnectedComponentsInstanceApproximator,
            InputType,
            MaxBipartiteMatching,
            Metric,
            Panoptica_Evaluator,
        )
        from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    # the package's values when nothing matched (lesion_wise_scores scores those cases itself)
    zero_tp = {
        Metric.DSC: MetricZeroTPEdgeCaseHandling(
            no_instances_result=EdgeCaseResult.NAN, default_result=EdgeCaseResult.ZERO
        ),
        Metric.HD95: MetricZeroTPEdgeCaseHandling(
            no_instances_result=EdgeCaseResult.NAN, default_result=EdgeCaseResult.INF
        ),
    }
    return Panoptica_Evaluator(
        edge_case_handler=EdgeCaseHandler(listmetric_zeroTP_handling=zero_tp),
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        instance_metrics=[Metric.DSC, Metric.HD95],
        global_metrics=[Metric.DSC],
        log_times=False,
        verbose=False,
    )


def lesion_wise_scores(
    pred, label, spacing: Sequence[float] | None = None, empty_score: float = BRATS_EMPTY_HD95, evaluator: Any = None
) -> dict[str, float]:
    """Lesion-wise scores of one binary region map against its reference, see the module docstring.

    Args:
        pred, label: binary arrays (numpy or torch) of one 2D or 3D shape, no channel dimension.
        spacing: voxel size per axis in mm (``None``: 1 mm), for HD95.
        empty_score: HD95 of an unmatched lesion (374 mm as BraTS 2023).
        evaluator: a :func:`lesion_evaluator` to reuse (built when ``None``).

    Returns:
        ``{quantity: value}`` for every name in :data:`LESION_QUANTITIES`.
    """
    pred_np = (convert_to_numpy(pred) != 0).astype(np.uint8)
    label_np = (convert_to_numpy(label) != 0).astype(np.uint8)
    if pred_np.shape != label_np.shape or pred_np.ndim not in (2, 3):
        raise ValueError(
            f"lesion_wise_scores needs two 2D or 3D masks of one shape, got {pred_np.shape} and {label_np.shape}."
        )
    evaluator = evaluator if evaluator is not None else lesion_evaluator()
    if not pred_np.any() and not label_np.any():
        tp = fp = fn = 0
        matched_dice_sum = matched_hd95_sum = 0.0
    else:
        sampling = None if spacing is None else tuple(float(s) for s in spacing)
        result = next(iter(evaluator.evaluate(pred_np, label_np, voxelspacing=sampling, verbose=False).values()))
        tp, fp, fn = int(result.tp), int(result.fp), int(result.fn)
        # sq_* are means over the tp matched pairs; undefined (edge-case values) when nothing matched
        matched_dice_sum = float(result.sq_dsc) * tp if tp else 0.0
        matched_hd95_sum = float(result.sq_hd95) * tp if tp else 0.0
    lesions = tp + fp + fn
    if lesions == 0:
        dice, hd95, dice_matched, hd95_matched = 1.0, 0.0, math.nan, math.nan
    else:
        dice = matched_dice_sum / lesions
        hd95 = (matched_hd95_sum + empty_score * (fp + fn)) / lesions
        dice_matched = matched_dice_sum / tp if tp else 0.0
        hd95_matched = matched_hd95_sum / tp if tp else float(empty_score)
    values = (dice, hd95, dice_matched, hd95_matched, tp, fp, fn)
    return {name: float(value) for name, value in zip(LESION_QUANTITIES, values)}


class LesionWiseMetric(RegionMetric):
    """Per-case, per-region :func:`lesion_wise_scores` as a MONAI cumulative metric.

    Inputs follow MONAI's metric conventions: batch-first binary region maps ``(B, R, H, W[, D])`` (or lists of
    channel-first ones); the voxel size comes from the ``MetaTensor`` affine of ``y_pred`` (else ``y``, else
    1 mm). The buffer is ``(num_cases, R, len(LESION_QUANTITIES))``; :meth:`aggregate` reduces one quantity.

    Args:
        quantity: the quantity :meth:`aggregate` reduces, one of :data:`LESION_QUANTITIES` (``"dice"``).
        empty_score: HD95 of an unmatched lesion.
        reduction: any :class:`monai.utils.MetricReduction`; NaN values (no lesion at all, for the matched
            means) are left out, as MONAI does.
        get_not_nans: whether :meth:`aggregate` also returns the count of not-NaN values.
    """

    def __init__(
        self,
        quantity: str = "dice",
        empty_score: float = BRATS_EMPTY_HD95,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        if quantity not in LESION_QUANTITIES:
            raise ValueError(f"quantity must be one of {LESION_QUANTITIES}, got {quantity!r}.")
        self.quantity = quantity
        self.empty_score = float(empty_score)
        self.evaluator = lesion_evaluator()

    def score(self, pred: np.ndarray, label: np.ndarray | None, spacing: np.ndarray | None) -> list[float]:
        return list(lesion_wise_scores(pred, label, spacing, self.empty_score, self.evaluator).values())

    def reducible(self, data: torch.Tensor) -> torch.Tensor:
        return data[..., LESION_QUANTITIES.index(self.quantity)]


class LesionWise(IgniteMetricHandler):
    """Ignite handler for :class:`LesionWiseMetric`, attached like MONAI's metric handlers.

    ``engine.state.metrics[name]`` is the mean of ``quantity`` (lesion-wise Dice by default). With
    ``save_details`` every quantity gets its own ``(num_cases, R)`` entry ``<name>_<quantity>`` in
    ``engine.state.metric_details`` (e.g. ``lesion_dice``, ``lesion_hd95``, ``lesion_fp``), which is what
    :class:`bundle.reports.SegmentationReport` turns into CSV columns.
    """

    def __init__(
        self,
        quantity: str = "dice",
        empty_score: float = BRATS_EMPTY_HD95,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = LesionWiseMetric(quantity=quantity, empty_score=empty_score, reduction=reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def compute(self) -> Any:
        result = super().compute()
        if self.save_details:
            details = self._engine.state.metric_details.pop(self._name)  # type: ignore[union-attr]
            for index, quantity in enumerate(LESION_QUANTITIES):
                self._engine.state.metric_details[f"{self._name}_{quantity}"] = details[..., index]  # type: ignore[union-attr]
        return result
