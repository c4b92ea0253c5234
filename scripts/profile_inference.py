"""Where the inference time of one BraTS-sized case goes, stage by stage, in CPU seconds (issue 19, item 1).

Runs ``configs/inference.json`` on one 240x240x155 four-modality case (``scripts/benchmark.py``'s BraTS-like
case, random weights at the given widths) the way ``SupervisedEvaluator`` does, but times each stage on its
own: every preprocessing transform (read, head mask and normalisation, pad, foreground crop), the slice
batches through the network, every postprocessing transform (activation, threshold, head guard, inverse,
label map, write). CPU time (``time.process_time``, all threads) is the figure to read on a shared machine;
wall time is printed beside it. Each variant runs in its own process, the variants alternated, so that the
before / after comparison sees the same load.

    OMP_NUM_THREADS=2 python scripts/profile_inference.py --work_dir /tmp/profile --repeats 3 \
        --variants "['before', 'after']"

``before`` is the bundle before the change (MONAI's ``SliceInferer``, the default allocator), ``after`` the
bundle as it is, ``channels_last`` the same with ``--channels_last true`` (see :data:`VARIANTS`). The table goes to
stdout and to ``<work_dir>/profile.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fire
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

#: overrides of each variant: ``before`` is the bundle before issue 19's item 1 (MONAI's ``SliceInferer``, the
#: default allocator), ``after`` the bundle as it is, ``channels_last`` the same with NHWC weights and slices
VARIANTS = {
    "before": {
        "reuse_memory": False,
        "inferer": {
            "_target_": "SliceInferer",
            "spatial_dim": 2,
            "roi_size": [-1, -1],
            "sw_batch_size": "@sw_batch_size",
            "progress": False,
        },
    },
    "after": {},
    "channels_last": {"channels_last": True},
}


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _stage_name(transform) -> str:
    return type(transform).__name__


def _profile_once(data: str, ckpt: str, out: str, features, overrides: dict) -> dict:
    """One case through the inference config, each stage timed; returns {stage: (cpu_s, wall_s)} and totals."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate
    from monai.transforms import Compose

    start = _Clock().__enter__()
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": data,
            "ckpt_path": ckpt,
            "output_dir": out,
            "features": features,
            "device": "$torch.device('cpu')",
            "progress": False,
            "num_workers": 0,
            **overrides,
        }
    )
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")  # network built, weights loaded by its handler on start
    start.__exit__()
    stages: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        with _Clock() as clock:
            result = fn(*args)
        cpu, wall = stages.get(name, [0.0, 0.0])
        stages[name] = [cpu + clock.cpu, wall + clock.wall]
        return result

    from ignite.engine import Events

    evaluator._fire_event(Events.STARTED)  # CheckpointLoader loads the weights here
    dataset = parser.get_parsed_content("dataset")
    item = dict(dataset.data[0])
    preprocessing: Compose = parser.get_parsed_content("preprocessing")
    total = _Clock().__enter__()
    for t in preprocessing.flatten().transforms:
        item = timed(f"pre: {_stage_name(t)}", lambda x, t=t: t(x), item)
    batch = timed("collate", list_data_collate, [item])
    network, inferer = evaluator.network, evaluator.inferer
    network.eval()
    inputs = batch["image"]
    with evaluator.mode(network):  # as SupervisedEvaluator._iteration runs it
        batch["pred"] = timed("network: slice batches", inferer, inputs, network)
    items = timed("decollate", decollate_batch, batch)
    postprocessing: Compose = parser.get_parsed_content("postprocessing")
    result = items[0]
    for t in postprocessing.flatten().transforms:
        result = timed(f"post: {_stage_name(t)}", lambda x, t=t: t(x), result)
    total.__exit__()
    return {"stages": stages, "total_cpu_s": total.cpu, "total_wall_s": total.wall, "setup_cpu_s": start.cpu}


def _worker(spec: str) -> None:
    spec = json.loads(spec)
    torch.set_num_threads(int(spec["threads"]))
    print(json.dumps(_profile_once(spec["data"], spec["ckpt"], spec["out"], spec["features"], spec["overrides"])))


def main(
    work_dir: str = "/tmp/segan_profile",
    features=(64, 128, 256, 512),
    threads: int = 1,
    repeats: int = 3,
    variants=("before", "after"),
) -> None:
    """Profile the variants, alternated, ``repeats`` times each; print the median per stage."""
    from benchmark import _write_brats_like_case

    from bundle.networks import SegANSegmentor

    features = [int(f) for f in features]
    data = _write_brats_like_case(os.path.join(work_dir, "case"))
    ckpt = os.path.join(work_dir, f"model_{'_'.join(map(str, features))}.pt")
    if not os.path.isfile(ckpt):
        torch.manual_seed(0)
        torch.save(SegANSegmentor(in_channels=3, out_channels=3, features=features).state_dict(), ckpt)
    runs = {v: [] for v in variants}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for r in range(int(repeats)):
        for v in variants if r % 2 == 0 else list(variants)[::-1]:
            spec = {
                "threads": threads,
                "data": data,
                "ckpt": ckpt,
                "out": os.path.join(work_dir, f"out_{v}"),
                "features": features,
                "overrides": VARIANTS[v],
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"variant {v} failed:\n{proc.stderr[-3000:]}")
            runs[v].append(json.loads(lines[-1]))
            print(
                f"  {v}: {runs[v][-1]['total_cpu_s']:.1f} CPU s, {runs[v][-1]['total_wall_s']:.1f} s wall", flush=True
            )
    table = {}
    for v, rs in runs.items():
        names = list(rs[0]["stages"])
        table[v] = {
            "stages": {
                n: {
                    "cpu_s": float(np.median([r["stages"][n][0] for r in rs])),
                    "wall_s": float(np.median([r["stages"][n][1] for r in rs])),
                }
                for n in names
            },
            "total_cpu_s": float(np.median([r["total_cpu_s"] for r in rs])),
            "total_wall_s": float(np.median([r["total_wall_s"] for r in rs])),
        }
    names = list(table[variants[0]]["stages"])
    print("| stage | " + " | ".join(f"{v} CPU s | {v} share" for v in variants) + " |")
    for n in names:
        row = []
        for v in variants:
            s = table[v]["stages"].get(n, {"cpu_s": 0.0})["cpu_s"]
            row += [f"{s:.2f}", f"{s / table[v]['total_cpu_s']:.0%}"]
        print(f"| {n} | " + " | ".join(row) + " |")
    print("| total | " + " | ".join(f"{table[v]['total_cpu_s']:.2f} | 100%" for v in variants) + " |")
    with open(os.path.join(work_dir, "profile.json"), "w") as f:
        json.dump(
            {"threads": threads, "repeats": repeats, "features": features, "runs": runs, "table": table}, f, indent=1
        )
    return table


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        fire.Fire(main)
