"""A voxel's normalised intensity does not depend on the field of view the pipeline holds (issue: a model with
Dice 0.98 on the training crop scored 0.14 over the whole volume of scans with a noisy background)."""

from functools import lru_cache

import numpy as np
import pytest
from helpers import ROOT
from monai.bundle import ConfigParser
from monai.transforms import Compose, NormalizeIntensity

from bundle.demo import make_demo_dataset
from bundle.intensity import ForegroundNormalized, head_mask
from bundle.phantom import make_demo_case

SHAPE = (64, 64, 40)
CHANNELS = ("t1c", "t2", "flair")


@lru_cache(maxsize=None)
def _case(background_noise):
    return make_demo_case(shape=SHAPE, seed=0, index=2, background_noise=background_noise)[0]


def _volume(background_noise):
    return np.stack([_case(background_noise)[m] for m in CHANNELS])


def _true_head():
    return _case(0.0)["t1"] > 0


@pytest.mark.parametrize("background_noise", [0.0, 0.05])
def test_head_mask_finds_the_head_whether_the_air_is_zero_or_noise(background_noise):
    mask = head_mask(_volume(background_noise))
    assert (mask == _true_head()).mean() > 0.995


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_cropping_away_noisy_air_leaves_every_head_voxel_unchanged(mode):
    volume = _volume(0.05)
    head = _true_head()
    lo = [int(np.argmax(head.any(axis=tuple(a for a in range(3) if a != k)))) for k in range(3)]
    crop = tuple(slice(max(v - 2, 0), None) for v in lo)  # cuts air on three sides, keeps the whole head
    whole = ForegroundNormalized("image", mode=mode).normalize(volume)[(slice(None), *crop)]
    cropped = ForegroundNormalized("image", mode=mode).normalize(volume[(slice(None), *crop)])
    np.testing.assert_allclose(cropped, whole, atol=1e-5)
    # the replaced normalisation (statistics of every non-zero voxel) moves the same voxels by far more
    old_whole = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(volume))[(slice(None), *crop)]
    old_cropped = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(volume[(slice(None), *crop)]))
    assert np.abs(old_whole - old_cropped)[:, head[crop]].max() > 0.05


def test_zscore_and_percentile_scaling_inside_the_head_and_zero_outside():
    volume = _volume(0.05)
    head = _true_head()
    z = ForegroundNormalized("image", mode="zscore").normalize(volume)
    np.testing.assert_allclose(z[:, head].mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, head].std(axis=1), 1.0, atol=1e-4)
    p = ForegroundNormalized("image", mode="percentile").normalize(volume)
    assert p.min() == 0.0 and p.max() == 1.0
    assert np.all(z[:, ~head] == 0) and np.all(p[:, ~head] == 0)


def test_an_empty_volume_stays_zero_and_bad_settings_are_refused():
    out = ForegroundNormalized("image").normalize(np.zeros((3, 8, 8, 4), np.float32))
    assert np.all(out == 0)
    with pytest.raises(ValueError, match="normalization"):
        ForegroundNormalized("image", mode="minmax")
    with pytest.raises(ValueError, match="percentiles"):
        ForegroundNormalized("image", mode="percentile", lower=60, upper=40)


def test_training_crop_and_whole_volume_inference_feed_the_network_the_same_values(tmp_path):
    """train.json's load chain (centre crop) and inference.json's (whole volume) agree inside the crop."""
    data = make_demo_dataset(tmp_path / "demo", num_cases=1, shape=SHAPE, background_noise=0.05)
    case = f"{data}/Demo_000/Demo_000"
    item = {"image": [f"{case}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")], "label": f"{case}_seg.nii.gz"}
    crop_size = [48, 48, 32]
    train = ConfigParser()
    train.read_config(str(ROOT / "configs" / "train.json"))
    train.update({"crop_size": crop_size, "patch_size": [32, 32]})
    infer = ConfigParser()
    infer.read_config(str(ROOT / "configs" / "inference.json"))
    infer.update({"crop_foreground": False})  # compare the full padded frame (the crop is tested on its own)
    cropped = Compose(train.get_parsed_content("load_transforms"))(dict(item))["image"]
    whole = Compose(infer.get_parsed_content("image_transforms"))({"image": item["image"]})["image"]
    assert cropped.shape[1:] == tuple(crop_size)
    start = [(w - c) // 2 for w, c in zip(SHAPE, crop_size)]
    pad = [(p - s) // 2 for p, s in zip(whole.shape[1:], SHAPE)]  # inference pads in-plane to multiples of 16
    box = tuple(slice(p + s, p + s + c) for p, s, c in zip(pad, start, crop_size))
    np.testing.assert_allclose(np.asarray(cropped), np.asarray(whole)[(slice(None), *box)], atol=1e-5)
