"""The loading benchmark (scripts/benchmark_loading.py) runs both pipelines on the training config and reports.

How much caching volumes and sampling many slices from each buys is a measurement, made by running the script
alone on the machine of interest (docs/README.md); a shared CI machine gives no meaningful wall-clock ratio, so this
test checks only that the benchmark runs and reports what it says it does.
"""

from bundle.demo import make_demo_dataset
from helpers import load_script


def test_benchmark_times_the_naive_and_the_cached_pipeline_and_prints_both(tmp_path, capsys):
    data = tmp_path / "demo"
    make_demo_dataset(str(data), num_cases=3, shape=(48, 48, 24), seed=2)
    results = load_script("benchmark_loading").benchmark(
        batches=2, dataset_dir=str(data), crop_size=[48, 48, 24], patch_size=[32, 32], slices_per_volume=8
    )
    assert set(results) == {"naive", "cached", "ratio"}
    assert results["naive"] > 0 and results["cached"] > 0
    assert results["ratio"] == results["cached"] / results["naive"]
    printed = capsys.readouterr().out
    assert "naive:" in printed and "cached:" in printed and "cached / naive:" in printed
