"""Training slices (Xue et al. 2018, section 3): many random axial patches per cached volume, cut by ``RandAxialSlicesd``.

The claims: the patches are exactly those of MONAI's ``RandSpatialCropSamplesd`` with a ``[h, w, 1]`` ROI for one
seed (so replacing it changed no training run), in either memory layout; each patch is a copy of the cache.
"""

import pytest
import torch
from monai.transforms import EnsureTyped, RandSpatialCropSamplesd, SqueezeDimd, Transposed

from bundle.sampling import RandAxialSlicesd

KEYS = ["image", "label"]


def _volume():
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(3, 40, 36, 12, generator=generator),
        "label": (torch.rand(3, 40, 36, 12, generator=generator) > 0.5).to(torch.uint8),
        "case": "Case_0",
    }


@pytest.mark.parametrize("slice_dim", [3, 1])
def test_patches_are_monais_random_spatial_crop_samples_for_one_seed(slice_dim):
    volume = _volume()
    monai_crop = RandSpatialCropSamplesd(keys=KEYS, roi_size=[32, 36, 1], num_samples=6, random_size=False)
    squeeze, to_float = SqueezeDimd(keys=KEYS, dim=-1), EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False)
    sampler = RandAxialSlicesd(keys=KEYS, patch_size=[32, 36], num_samples=6, slice_dim=slice_dim)
    monai_crop.set_random_state(11)
    sampler.set_random_state(11)
    layout = volume if slice_dim == 3 else Transposed(keys=KEYS, indices=[0, 3, 1, 2])(volume)
    for _ in range(3):  # successive calls draw new patches, in step with MONAI's
        expected = [to_float(squeeze(sample)) for sample in monai_crop(volume)]
        patches = sampler(layout)
        assert len(patches) == 6
        for want, got in zip(expected, patches):
            assert got["case"] == "Case_0"
            for key in KEYS:
                assert type(got[key]) is torch.Tensor and got[key].dtype == torch.float32
                assert torch.equal(got[key], torch.as_tensor(want[key]))


def test_a_patch_is_a_copy_so_the_cached_volume_cannot_change():
    volume = _volume()
    before = volume["image"].clone()
    patch = RandAxialSlicesd(keys=KEYS, patch_size=16, num_samples=1)(volume)[0]
    patch["image"].add_(100.0)
    assert torch.equal(volume["image"], before)


def test_a_2d_image_is_refused_with_its_key():
    with pytest.raises(ValueError, match="'image' of shape \\(3, 40, 36\\)"):
        RandAxialSlicesd(keys=KEYS, patch_size=16, num_samples=2)(
            {"image": torch.zeros(3, 40, 36), "label": torch.zeros(3, 40, 36)}
        )


def test_the_training_loader_gives_the_same_batches_with_either_cache_layout(tmp_path):
    from helpers import small_train_parser
    from monai.utils import set_determinism

    from bundle.demo import make_demo_dataset

    data = make_demo_dataset(str(tmp_path / "demo"), num_cases=4, shape=(40, 36, 24), seed=2)
    batches = {}
    for slice_major in (True, False):
        parser = small_train_parser(data, slice_major=slice_major)
        assert parser.get_parsed_content("slice_sampler").slice_dim == (1 if slice_major else 3)
        set_determinism(seed=0)
        batches[slice_major] = next(iter(parser.get_parsed_content("train#dataloader")))
        set_determinism(seed=None)
    assert batches[True]["image"].shape == (10, 3, 24, 20) and batches[True]["label"].shape == (10, 3, 24, 20)
    for key in KEYS:
        assert torch.equal(batches[True][key], batches[False][key])
