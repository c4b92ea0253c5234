"""Memory that scales (issue 19, item 2): the training cache in float16 or uint8, on disk, and estimated first.

The claims: a smaller cache gives back the same patches up to its stated precision, with the air (0) and the
region maps exact; float32 changes nothing; the estimate is cases x shape x channels x bytes and stops a
cache that would not fit with the key to change; ``cache_dir`` caches on disk.
"""

import pytest
import torch
from helpers import small_train_parser
from monai.transforms import Transposed

from bundle.memory import (
    CacheDtyped,
    TrainingCache,
    available_memory,
    cached_item_bytes,
    case_bytes,
    check_cache_memory,
    restore,
)
from bundle.sampling import RandAxialSlicesd

KEYS = ["image", "label"]


def _volume():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 40, 36, 12, generator=generator) * 2 + 1
    image[:, :4] = 0  # air: what the normalisation leaves outside the head
    return {
        "image": image,
        "label": (torch.rand(3, 40, 36, 12, generator=generator) > 0.5).to(torch.uint8),  # as LabelToRegionsd
        "case": "Case_0",
    }


def _patches(dtype, slice_dim=1):
    volume = Transposed(keys=KEYS, indices=[0, 3, 1, 2])(_volume()) if slice_dim == 1 else _volume()
    stored = CacheDtyped(keys=KEYS, dtype=dtype)(volume)
    sampler = RandAxialSlicesd(keys=KEYS, patch_size=[32, 30], num_samples=5, slice_dim=slice_dim)
    sampler.set_random_state(3)
    return stored, sampler(stored)


def test_float32_stores_the_volume_unchanged_and_gives_the_same_patches():
    volume = _volume()
    stored = CacheDtyped(keys=KEYS, dtype="float32")(volume)
    assert stored.keys() == volume.keys() and all(stored[k] is volume[k] for k in KEYS)


@pytest.mark.parametrize("dtype, bytes_per_voxel, tolerance", [("float16", 2, 2.0**-10), ("uint8", 1, None)])
@pytest.mark.parametrize("slice_dim", [1, 3])
def test_a_smaller_cache_gives_the_same_patches_within_its_precision_air_and_regions_exact(
    dtype, bytes_per_voxel, tolerance, slice_dim
):
    _, reference = _patches("float32", slice_dim)
    stored, patches = _patches(dtype, slice_dim)
    assert stored["image"].element_size() == bytes_per_voxel
    assert stored["label"].dtype == torch.uint8 and stored["label"].shape[0] == 3
    image = _volume()["image"]
    span = (image.amax(dim=(1, 2, 3)).clamp(min=0) - image.amin(dim=(1, 2, 3)).clamp(max=0)).view(3, 1, 1)
    for want, got in zip(reference, patches):
        assert set(got) == set(want) == {"image", "label", "case"}  # the encoding does not reach the batch
        assert got["image"].dtype == torch.float32 and got["label"].dtype == torch.float32
        assert torch.equal(got["label"], want["label"])
        assert torch.equal(got["image"] == 0, want["image"] == 0)  # air stays exactly 0, nothing else becomes 0
        error = (got["image"] - want["image"]).abs()
        if dtype == "uint8":  # half a level; one level next to 0 and at the top
            assert bool((error <= span / 255 + 1e-6).all())
        else:
            assert bool((error <= tolerance * want["image"].abs()).all())


def test_restored_patches_are_copies_of_the_cache():
    stored, _ = _patches("uint8")
    before = stored["image"].clone()
    patch = restore(stored["image"][:, 0], stored["image_encoding"])
    patch.add_(1)
    assert torch.equal(stored["image"], before)


def test_a_cached_case_takes_what_the_estimate_says():
    volume = Transposed(keys=KEYS, indices=[0, 3, 1, 2])(_volume())
    for dtype in ("float32", "float16", "uint8"):
        stored = CacheDtyped(keys=KEYS, dtype=dtype)(volume)
        encodings = sum(v.numel() * v.element_size() for k, v in stored.items() if k.endswith("_encoding"))
        assert cached_item_bytes(stored) - encodings == case_bytes([40, 36, 12], 3, 3, dtype)


def test_the_paper_crop_of_brats_2021_takes_78_gb_in_float32_and_31_gb_in_uint8():
    per_case = {dtype: case_bytes([180, 180, 128], 3, 3, dtype) for dtype in ("float32", "float16", "uint8")}
    assert per_case["float32"] == 180 * 180 * 128 * (3 * 4 + 3)  # 62.2 MB: the region maps are uint8 already
    assert per_case["float16"] == 180 * 180 * 128 * (3 * 2 + 3)  # 37.3 MB
    assert per_case["uint8"] == 180 * 180 * 128 * (3 + 3)  # 24.9 MB
    assert 1251 * per_case["float32"] > 77e9 and 1251 * per_case["uint8"] < 31.2e9


def test_a_cache_that_would_not_fit_stops_with_the_keys_to_change():
    with pytest.raises(MemoryError, match="--cache_dtype uint8.*--cache_dir.*--cache_rate"):
        check_cache_memory(1251, [180, 180, 128], 3, 3, "float32", available=64 * 10**9)
    assert check_cache_memory(1251, [180, 180, 128], 3, 3, "uint8", available=64 * 10**9) == 1251 * case_bytes(
        [180, 180, 128], 3, 3, "uint8"
    )


def test_the_memory_available_is_read_from_the_system():
    available = available_memory()
    assert available is None or available > 0


def test_a_quantised_cache_refuses_a_sampler_that_cannot_restore_it():
    from monai.transforms import RandSpatialCropSamplesd

    sampler = RandSpatialCropSamplesd(keys=KEYS, roi_size=[8, 8, 1], num_samples=2)
    with pytest.raises(ValueError, match="RandAxialSlicesd.*--cache_dtype float32"):
        TrainingCache(cache_dtype="uint8", sampler=sampler)


def _first_batch(parser):
    from monai.utils import set_determinism

    set_determinism(seed=0)
    try:
        return next(iter(parser.get_parsed_content("train#dataloader")))
    finally:
        set_determinism(seed=None)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from bundle.demo import make_demo_dataset

    return make_demo_dataset(str(tmp_path_factory.mktemp("memory") / "demo"), num_cases=4, shape=(40, 36, 24), seed=2)


def test_the_training_config_caches_uint8_on_disk_and_gives_the_batches_of_the_memory_cache(demo_data, tmp_path):
    from monai.data import CacheDataset, PersistentDataset

    from bundle.guards import require_foreground

    memory = small_train_parser(demo_data, cache_dtype="uint8")
    assert isinstance(memory.get_parsed_content("train#dataset"), CacheDataset)
    assert require_foreground(memory.get_parsed_content("train#dataset"), memory.get_parsed_content("regions"))
    disk = small_train_parser(demo_data, cache_dtype="uint8", cache_dir=str(tmp_path / "cache"))
    assert isinstance(disk.get_parsed_content("train#dataset"), PersistentDataset)
    expected, got = _first_batch(memory), _first_batch(disk)
    assert any((tmp_path / "cache").iterdir())
    reference = _first_batch(small_train_parser(demo_data))
    for key in KEYS:
        assert torch.equal(got[key], expected[key])
        assert got[key].dtype == torch.float32
    assert torch.equal(got["label"], reference["label"])
    assert float((got["image"] - reference["image"]).abs().max()) < 0.1


def test_the_training_config_stops_before_caching_when_memory_is_short(demo_data):
    parser = small_train_parser(demo_data, cache_memory_fraction=1e-9)
    with pytest.raises(RuntimeError) as raised:  # MONAI's instantiation wraps the error, which it chains
        parser.get_parsed_content("train#dataset")
    assert isinstance(raised.value.__cause__, MemoryError) and "--cache_dtype" in str(raised.value.__cause__)
