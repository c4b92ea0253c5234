"""Measure how fast the training pipeline delivers slices: cached volumes sampled many times vs reloading.

Builds ``train#dataloader`` from the training config twice in one process and times the slices per second
it yields (no network, data only):

- ``naive``: a plain ``Dataset`` that loads, crops and normalises the 3D files again for every single slice
  (one slice per volume load, batches of the same number of slices): what a per-slice 2D pipeline over
  3D files costs;
- ``cached``: the bundle's pipeline, a ``CacheDataset`` of preprocessed volumes, ``slices_per_volume``
  random slices cut from each cached volume per visit.

Example (the demo data; add ``--config_file`` overlays and ``--dataset_dir`` for BraTS)::

    python scripts/benchmark_loading.py --batches 10
"""

from __future__ import annotations

import os
import sys
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _batches(loader):
    while True:  # as many epochs as it takes
        yield from loader


def _slices_per_second(parser, batches: int) -> float:
    loader = parser.get_parsed_content("train#dataloader")  # a CacheDataset fills its cache here, untimed
    stream = _batches(loader)
    next(stream)  # warm-up: worker start-up
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        count += next(stream)["image"].shape[0]
    return count / (time.perf_counter() - start)


def benchmark(
    config_file: str | list[str] = ("configs/train.json", "configs/demo.json"),
    batches: int = 10,
    num_workers: int = 0,
    **overrides,
) -> dict[str, float]:
    """Print and return slices/s of the naive and the cached pipeline, and their ratio.

    Args:
        config_file: the training config and overlays, relative to the bundle root or absolute.
        batches: batches timed per pipeline (after one warm-up batch).
        num_workers: data loader workers for both pipelines.
        overrides: any config key, e.g. ``--dataset_dir /data/BraTS2015``.
    """
    from monai.bundle import ConfigParser

    files = [config_file] if isinstance(config_file, str) else list(config_file)
    files = [f if os.path.isabs(f) else os.path.join(ROOT, f) for f in files]
    results = {}
    for name in ("naive", "cached"):
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({"bundle_root": ROOT, "num_workers": num_workers, **overrides})
        if name == "naive":  # the same batch size in slices, each slice from a fresh load of its volume
            batch = parser.get_parsed_content("slices_per_volume") * parser.get_parsed_content("volumes_per_batch")
            parser.update({"train#dataset#_target_": "Dataset", "slices_per_volume": 1, "volumes_per_batch": batch})
        if name == "naive":  # a plain Dataset takes no cache arguments
            for key in ("cache_rate", "num_workers", "copy_cache"):
                parser["train"]["dataset"].pop(key, None)
        results[name] = _slices_per_second(parser, batches)
        print(f"{name:>7}: {results[name]:8.1f} slices/s", flush=True)
    results["ratio"] = results["cached"] / results["naive"]
    print(f"cached / naive: {results['ratio']:.1f}x")
    return results


def main(**kwargs) -> None:
    """Command-line entry: see :func:`benchmark`."""
    benchmark(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
