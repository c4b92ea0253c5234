"""One command for the GPU paths: every trainer with AMP, channels_last and cuDNN autotuning, one DDP run under
torchrun, and inference on a BraTS-sized case, each through ``python -m monai.bundle run`` as a user runs it.

No GPU has been lent to this project yet, so these paths are covered on the CPU by the tests only as far as
PyTorch allows (bfloat16 autocast runs on a CPU; the gradient scaler, channels_last kernels and cuDNN do not).
Run this the first time a GPU machine is at hand and copy its table into ``docs/performance.md``::

    python scripts/gpu_check.py                      # on a GPU: every path, AMP on, prints a table
    python scripts/gpu_check.py --device cpu          # the same paths on a CPU (bfloat16 autocast), to try it
    python scripts/gpu_check.py --paths "['S3-3C','U-net']" --out eval/gpu_check.json

Each path runs in its own process on a tiny demo dataset (made once in ``work_dir``) for ``epochs`` epochs,
then reports pass/fail and wall seconds (process start and data included); the table and a JSON file give the
device, the AMP dtype and torch's version. A path fails when its process exits non-zero, logs a non-finite loss,
or (inference) writes no label map.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import fire

ROOT = Path(__file__).resolve().parents[1]

#: Trainer paths: (name, extra config overlays, overrides).
TRAINING_PATHS = {
    "S3-3C": ((), {}),
    "S3-1C": (("configs/variants/s3_1c.json",), {}),
    "S1-1C": (("configs/variants/s1_1c.json",), {}),
    "S3-3C 2.5D": (("configs/variants/context_2_5d.json",), {}),
    "S3-3C sagittal": ((), {"slice_axis": 0}),
    "S3-3C 3D": (("configs/variants/segan3d.json",), {"roi_size": [32, 32, 32], "channels_last": False}),
    "U-net": (("configs/variants/unet.json",), {"dice_weight": 1.0}),
    "Moeskops": (
        ("configs/moeskops/multiclass.json", "configs/moeskops/dilated.json", "configs/moeskops/adversarial.json"),
        {"network_def#features": 8, "discriminator_features": 8, "discriminator_hidden": 16},
    ),
}
#: the BraTS-sized inference paths and their overrides: the default (whole slices of the head crop on a GPU) and
#: each slice cut to its own foreground box, the CPU default (``crop_slices``), to choose the GPU's default by
OTHER_PATHS = {"DDP": {}, "inference BraTS-sized": {}, "inference BraTS-sized, slice crops": {"crop_slices": True}}
TINY = {
    "demo_num_cases": 12,
    "demo_shape": [64, 64, 32],
    "crop_size": [64, 64, -1],
    "patch_size": [48, 48],
    "features": [8, 16, 32, 64],
    "critic_features": [8, 16, 32],
    "slices_per_volume": 4,
    "volumes_per_batch": 2,
    "val_interval": 1,
    "num_workers": 0,
    "progress": False,
    "tensorboard": False,
}


def _options(settings: dict) -> list[str]:
    return [
        arg
        for key, value in settings.items()
        for arg in (f"--{key}", json.dumps(value) if not isinstance(value, str) else value)
    ]


def _run(command: Sequence[str], log: Path, env: Optional[dict] = None) -> tuple[bool, float, str]:
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(list(command), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    text = log.read_text(encoding="utf-8", errors="replace")
    ok = code == 0 and "non-finite" not in text.lower()
    return ok, time.perf_counter() - start, text


def gpu_check(
    device: str = "auto",
    paths: Union[Sequence[str], str, None] = None,
    epochs: int = 1,
    work_dir: str = "gpu_check_runs",
    out: Optional[str] = None,
) -> None:
    """Run the chosen ``paths`` (default: all) with AMP and print pass/fail and time per path.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cuda"`` or ``"cpu"``: picks the AMP dtype and the GPU-only speed
            keys; the configs run on CUDA whenever torch sees it.
        paths: names from the trainer paths (S3-3C, S3-1C, S1-1C, S3-3C 2.5D, S3-3C 3D, U-net, Moeskops), ``DDP`` and
            ``inference BraTS-sized`` and ``inference BraTS-sized, slice crops``.
        epochs: training epochs per trainer path.
        work_dir: folder of the demo data and of every run's bundle root and log.
        out: JSON file for the results (default ``<work_dir>/gpu_check.json``).
    """
    import torch

    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device; use --device cpu to try the paths on a CPU.")
    names = (
        list(TRAINING_PATHS) + list(OTHER_PATHS)
        if paths is None
        else ([paths] if isinstance(paths, str) else list(paths))
    )
    unknown = [n for n in names if n not in TRAINING_PATHS and n not in OTHER_PATHS]
    if unknown:
        raise ValueError(f"unknown paths {unknown}: choose from {list(TRAINING_PATHS) + list(OTHER_PATHS)}.")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    speed = {
        "amp": True,
        "amp_dtype": "bfloat16" if not cuda or torch.cuda.is_bf16_supported() else "float16",
        "channels_last": cuda,
        "cudnn_benchmark": cuda,
    }
    base = ["configs/train.json", "configs/demo.json"]
    data = {"demo_dir": str(work / "data"), **TINY}
    results = []
    for name in names:
        run_root = work / name.replace(" ", "_").replace(".", "").replace(",", "")
        run_root.mkdir(parents=True, exist_ok=True)
        log = run_root / "run.log"
        settings = {**data, **speed, "bundle_root": str(run_root), "max_epochs": int(epochs)}
        if name in TRAINING_PATHS:
            overlays, overrides = TRAINING_PATHS[name]
            configs = [str(ROOT / c) for c in (*base, *overlays)]
            command = [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "training",
                "--config_file",
                json.dumps(configs),
                *_options({**settings, **overrides}),
            ]
            ok, seconds, _ = _run(command, log)
        elif name == "DDP":
            configs = [str(ROOT / c) for c in (*base, "configs/multi_gpu_train.json")]
            nproc = max(torch.cuda.device_count(), 1) if cuda else 2
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                json.dumps(configs),
                *_options(settings),
            ]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            ok, seconds, _ = _run(command, log, env)
        else:
            ok, seconds = _inference_brats_sized(run_root, {**settings, **OTHER_PATHS[name]}, log)
        results.append({"path": name, "ok": ok, "seconds": round(seconds, 1), "log": str(log)})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<24} {seconds:7.1f} s  ({log})", flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "amp_dtype": speed["amp_dtype"],
        "torch": torch.__version__,
        "results": results,
    }
    target = Path(out) if out else work / "gpu_check.json"
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [r["path"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} paths passed; results in {target}", flush=True)
    if failed:
        raise SystemExit(f"failed paths: {', '.join(failed)}; see their logs.")


def _inference_brats_sized(run_root: Path, settings: dict, log: Path) -> tuple[bool, float]:
    """Inference with the paper's widths (random weights) on one 240x240x155 phantom case, written as NIfTI."""
    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser

    from bundle.demo import make_demo_dataset

    data = run_root / "case"
    if not (data / "demo.json").is_file():
        make_demo_dataset(str(data), num_cases=1, shape=(240, 240, 155))
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"features": [64, 128, 256, 512]})
    models = run_root / "models"
    models.mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    keep = {
        k: v
        for k, v in settings.items()
        if k in ("amp", "amp_dtype", "device", "channels_last", "cudnn_benchmark", "bundle_root", "crop_slices")
    }
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(ROOT / "configs" / "inference.json"),
        *_options({**keep, "dataset_dir": str(data), "features": [64, 128, 256, 512], "progress": False}),
    ]
    ok, seconds, _ = _run(command, log)
    return ok and any((run_root / "eval").glob("*_seg.nii.gz")), seconds


if __name__ == "__main__":
    fire.Fire(gpu_check)
