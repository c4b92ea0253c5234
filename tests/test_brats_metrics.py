"""HD95 as the BraTS challenge computes it (``bundle.metrics.brats_hd95``), checked against a brute-force reading
of its definition: surface voxels (removed by a face-connected erosion) of both masks, the distance in mm from
each to the nearest surface voxel of the other mask, both directions pooled, 95th percentile."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from bundle.metrics import BRATS_EMPTY_HD95, brats_hd95

# MONAI's own HausdorffDistance passes a deprecated argument to get_mask_edges; nothing to do with this bundle
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")


def _surface(mask):
    return np.argwhere(mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1)))


def _brute_force_hd95(pred, label, spacing):
    a, b = _surface(pred) * spacing, _surface(label) * spacing
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.hstack((pairwise.min(1), pairwise.min(0))), 95)


@pytest.mark.parametrize("seed, spacing", itertools.product([0, 1, 2], [(1.0, 1.0, 1.0), (0.9, 1.2, 2.5)]))
def test_hd95_pools_both_directions_in_millimetres(seed, spacing):
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_dilation(rng.random((18, 16, 12)) > 0.97, iterations=2)
    label = ndimage.binary_dilation(rng.random((18, 16, 12)) > 0.97, iterations=2)
    expected = _brute_force_hd95(pred, label, np.asarray(spacing))
    assert brats_hd95(pred, label, spacing) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("offset", [(0, 0, 0), (20, 9, 5)])
def test_hd95_of_small_masks_in_a_large_volume_is_unchanged_by_cropping_to_them(offset):
    """Only the masks' bounding box is searched: masks on the volume's border or deep inside score as brute force."""
    rng = np.random.default_rng(3)
    pred = ndimage.binary_dilation(rng.random((12, 10, 8)) > 0.97, iterations=2)
    label = ndimage.binary_dilation(rng.random((12, 10, 8)) > 0.97, iterations=2)
    large_pred, large_label = np.zeros((40, 30, 20), bool), np.zeros((40, 30, 20), bool)
    inner = tuple(slice(o, o + n) for o, n in zip(offset, pred.shape))
    large_pred[inner], large_label[inner] = pred, label
    spacing = np.asarray([0.9, 1.2, 2.5])
    assert brats_hd95(large_pred, large_label, spacing) == pytest.approx(
        _brute_force_hd95(large_pred, large_label, spacing), rel=1e-9
    )


def test_hd95_is_not_monais_larger_directed_percentile():
    """A far island of 12 voxels only in the prediction: over 5% of the prediction's surface, under 5% of the pooled
    surfaces. MONAI's HausdorffDistanceMetric (the larger directed 95th percentile) reports the island; BraTS does not.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    label = np.zeros((40, 12, 12), bool)
    label[2:8, 2:8, 2:8] = True  # 152 surface voxels
    pred = label.copy()
    pred[30:32, 4:6, 4:7] = True  # 12 more, all surface, 23 to 24 voxels away
    ours = brats_hd95(pred, label)
    monai = float(
        compute_hausdorff_distance(torch.as_tensor(pred)[None, None], torch.as_tensor(label)[None, None], percentile=95)
    )
    assert ours == pytest.approx(_brute_force_hd95(pred, label, np.ones(3)))
    assert ours < 1.0 < 20.0 < monai


def test_empty_regions_score_as_the_challenge():
    empty, some = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    some[2:5, 2:5, 2:5] = True
    assert brats_hd95(empty, empty) == 0.0
    assert brats_hd95(empty, some) == BRATS_EMPTY_HD95 == 374.0
    assert brats_hd95(some, empty, empty_score=100.0) == 100.0
