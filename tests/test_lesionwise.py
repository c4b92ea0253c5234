"""Lesion-wise Dice and HD95 as BraTS ranks since 2023 (``bundle.lesionwise``, computed by ``panoptica``).

Each claim is checked on masks whose lesions are known by construction: a missed reference lesion and a spurious
predicted one each count as a lesion with Dice 0 and HD95 374 mm, the matching is one to one, and the matched
lesion's own Dice and HD95 are the plain ones of that lesion pair (computed here without ``panoptica``).
The end-to-end test runs ``configs/evaluate.json --lesion_wise true`` and then evaluates the written label maps
as the official BraTS evaluation package does (``panoptica`` reading the NIfTI files, its glioma configuration
with this bundle's label values): the report and the external evaluation must agree.
"""

import math
import sys

import numpy as np
import pytest
from helpers import ROOT
from monai.bundle import ConfigParser

from bundle.lesionwise import LESION_QUANTITIES, lesion_evaluator, lesion_wise_scores
from bundle.metrics import BRATS_EMPTY_HD95, brats_hd95

CONFIGS = [str(ROOT / "configs" / name) for name in ("inference.json", "evaluate.json")]

SPACING = (1.0, 1.2, 2.5)


def _dice(a, b):
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _box(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


@pytest.fixture(scope="module")
def evaluator():
    pytest.importorskip("panoptica", reason="lesion-wise metrics need the optional 'lesionwise' extra")
    return lesion_evaluator()


def test_missed_and_spurious_lesions_each_count_as_a_lesion_scored_zero(evaluator):
    shape = (40, 40, 24)
    large = _box(shape, slice(5, 20), slice(5, 20), slice(4, 14))
    small = _box(shape, slice(30, 34), slice(30, 34), slice(18, 21))  # missed
    found = _box(shape, slice(7, 21), slice(5, 18), slice(5, 14))  # overlaps the large lesion
    spurious = _box(shape, slice(30, 33), slice(2, 5), slice(2, 4))  # touches no lesion
    scores = lesion_wise_scores(found | spurious, large | small, SPACING, evaluator=evaluator)

    assert list(scores) == list(LESION_QUANTITIES)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 1)
    matched_dice, matched_hd95 = _dice(found, large), brats_hd95(found, large, SPACING)
    assert scores["dice_matched"] == pytest.approx(matched_dice, abs=1e-6)
    assert scores["hd95_matched"] == pytest.approx(matched_hd95, abs=1e-4)
    assert scores["dice"] == pytest.approx(matched_dice / 3, abs=1e-6)
    assert scores["hd95"] == pytest.approx((matched_hd95 + 2 * BRATS_EMPTY_HD95) / 3, abs=1e-4)
    # the case-wise Dice of the same masks hides the missed lesion: the lesion-wise one does not
    assert _dice(found | spurious, large | small) > scores["dice"] + 0.5


def test_one_predicted_component_is_matched_to_one_reference_lesion_only(evaluator):
    shape = (30, 30, 12)
    left = _box(shape, slice(4, 14), slice(4, 24), slice(2, 10))
    right = _box(shape, slice(16, 20), slice(4, 24), slice(2, 10))  # 2 voxels of gap: a second lesion
    bridge = _box(shape, slice(4, 20), slice(4, 24), slice(2, 10))  # one component over both and the gap
    scores = lesion_wise_scores(bridge, left | right, evaluator=evaluator)

    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)
    assert scores["dice_matched"] == pytest.approx(_dice(bridge, left), abs=1e-6)  # the better of the two pairs
    assert scores["dice"] == pytest.approx(_dice(bridge, left) / 2, abs=1e-6)


def test_empty_maps_score_as_brats(evaluator):
    shape = (16, 16, 8)
    empty = np.zeros(shape, bool)
    lesion = _box(shape, slice(4, 9), slice(4, 9), slice(2, 6))

    both = lesion_wise_scores(empty, empty, evaluator=evaluator)
    assert (both["dice"], both["hd95"], both["tp"], both["fp"], both["fn"]) == (1.0, 0.0, 0, 0, 0)
    assert math.isnan(both["dice_matched"]) and math.isnan(both["hd95_matched"])  # no lesion: left out of means

    missed = lesion_wise_scores(empty, lesion, evaluator=evaluator)
    spurious = lesion_wise_scores(lesion, empty, evaluator=evaluator)
    assert (missed["fn"], spurious["fp"]) == (1, 1)
    for scores in (missed, spurious):
        assert (scores["dice"], scores["hd95"]) == (0.0, BRATS_EMPTY_HD95)
        assert (scores["dice_matched"], scores["hd95_matched"]) == (0.0, BRATS_EMPTY_HD95)


def test_without_panoptica_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "panoptica", None)  # makes `import panoptica` raise ImportError
    with pytest.raises(ImportError, match=r"segan-bundle\[lesionwise\].*--lesion_wise false"):
        lesion_evaluator()


def test_evaluation_needs_panoptica_only_when_lesion_wise_scores_are_asked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "panoptica", None)
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    assert parser.get_parsed_content("lesion_metric") is None  # the default: no panoptica needed
    assert "lesion" not in parser.get_parsed_content("evaluator#additional_metrics")

    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser["lesion_wise"] = "true"
    with pytest.raises(RuntimeError) as failure:
        parser.get_parsed_content("lesion_metric")
    assert "pip install" in str(failure.value.__cause__)
