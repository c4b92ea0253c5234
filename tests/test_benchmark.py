"""The loading benchmark runs and shows what caching volumes and sampling many slices from each buys."""

from bundle.demo import make_demo_dataset
from helpers import load_script


def test_cached_slice_sampling_outpaces_reloading_a_volume_per_slice(tmp_path):
    data = tmp_path / "demo"
    make_demo_dataset(str(data), num_cases=3, shape=(48, 48, 24), seed=2)
    results = load_script("benchmark_loading").benchmark(
        batches=2, dataset_dir=str(data), crop_size=[48, 48, 24], patch_size=[32, 32], slices_per_volume=8
    )
    assert results["naive"] > 0
    assert results["cached"] > 2 * results["naive"]
