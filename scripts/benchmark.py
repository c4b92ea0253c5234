"""Where SegAN's time goes: training, the data pipeline, inference and FLOPs, measured in one run.

Prints a table and writes everything to a JSON file. On a machine shared with other work wall-clock figures
move with the load, so every comparison is made inside one run, the two sides interleaved (A B A B ...), and
CPU time (``time.process_time``, all threads of the process) is reported beside wall time: on an oversubscribed
CPU it is the steadier measure of work done. Sections:

1. **training**: the bundle's ``SegANTrainer`` (built from ``configs/train.json``, no handlers) against a
   minimal plain-PyTorch loop doing the same critic and segmentor steps on the same networks and the same
   batches; their time ratio, and training slices/s at the demo's and the paper's widths;
2. **data**: slices/s of ``train#dataloader`` (volumes cached, ``slices_per_volume`` random 2D crops from each
   per visit) against a naive pipeline that reloads its volume for every slice, on BraTS-sized synthetic cases;
3. **inference**: one 240x240x155 4-modality case with paper widths, load to NIfTI written, each variant in its
   own process (wall, CPU and peak resident memory): the bundle's inference (foreground crop), the full frame,
   and a naive loop that runs the network on one slice at a time;
4. **flops**: FLOPs per slice of the segmentor and the critics (``torch.utils.flop_counter``) and the fraction of
   the measured float32 matmul peak that training and inference reach (FLOP per CPU-second over the matmul's);
5. **options**: CPU time of one training iteration and of inference on one case's slices with each speed
   option, relative to the default;
6. **scaling**: training cost per slice against batch size, slice size and number of regions (demo widths).

The synthetic case imitates a BraTS frame: a demo head (``bundle.demo``) of 160x196x155 voxels placed in a
240x240x155 frame of zeros, so its foreground box (about 125x164 voxels over 124 slices) is BraTS-like.
Weights are random: speed does not depend on them.

Examples::

    python scripts/benchmark.py                       # the full run (about 5-10 minutes on 2 CPU cores)
    python scripts/benchmark.py --quick true          # seconds: tiny sizes, to check that it runs
    python scripts/benchmark.py --report eval/benchmark.json   # the table of an earlier run
    python scripts/benchmark.py --device cuda --threads 16 --train_batch 64
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TRAIN = os.path.join(ROOT, "configs", "train.json")
INFERENCE = os.path.join(ROOT, "configs", "inference.json")
DEMO_WIDTHS = {"features": [16, 32, 64, 128], "critic_features": [16, 32, 64]}
PAPER_WIDTHS = {"features": [64, 128, 256, 512], "critic_features": [64, 128, 256]}
BRATS_FRAME = (240, 240, 155)
BRATS_HEAD = (160, 196, 155)  # the demo head's box inside the frame; its foreground is about 125x164x124


# ---------------------------------------------------------------------------------------------- helpers
class Clock:
    """Wall and CPU seconds of a ``with`` block (CPU: all threads of this process)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _parser(config, overrides: dict, **globals_):
    from monai.bundle import ConfigParser

    parser = ConfigParser(globals={"monai": "monai", "torch": "torch", "np": "numpy", "numpy": "numpy", **globals_})
    parser.read_config(config)
    parser.update({"bundle_root": ROOT, **overrides})
    return parser


def _batches(count: int, batch: int, in_channels: int, regions: int, size: int, device, seed: int = 0) -> list:
    """Fixed training batches: normalised-looking images and nested blob-like region maps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        image = torch.randn(batch, in_channels, size, size, generator=g)
        smooth = torch.nn.functional.avg_pool2d(torch.randn(batch, 1, size, size, generator=g), 9, 1, 4)
        label = torch.cat([(smooth > t).float() for t in np.linspace(0.0, 0.3, regions)], 1)
        out.append({"image": image.to(device), "label": label.to(device)})
    return out


def _plain_iteration(network, critic, optimizer, critic_optimizer, loss_fn, clip, image, label) -> None:
    """One SegAN iteration in plain PyTorch: a critic step ascending the loss, clamp, a segmentor step."""
    network.train()
    critic.train()
    pred = torch.sigmoid(network(image))
    critic_optimizer.zero_grad(set_to_none=True)
    (-loss_fn(critic(image, pred.detach()), critic(image, label))).backward()
    critic_optimizer.step()
    if clip:
        critic.clamp_(clip)
    critic.requires_grad_(False)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        real = critic(image, label)
    loss_fn(critic(image, pred), real).backward()
    optimizer.step()
    critic.requires_grad_(True)


def _training_setup(widths: dict, batch: int, size: int, regions: int, device, options: dict, count: int = 2):
    """The bundle's trainer (no handlers) and its networks, optimisers and loss, plus fixed batches."""
    batches = _batches(count, batch, 3, regions, size, device)
    region_names = {f"r{i}": [i + 1] for i in range(regions)}
    parser = _parser(
        TRAIN,
        {
            **widths,
            **options,
            "device": f"$torch.device('{device}')",
            "patch_size": [size, size],
            "regions": region_names,
            "train#trainer#train_data_loader": "$benchmark_batches",
            "train#trainer#train_handlers": [],
            "train#trainer#max_epochs": 1,
        },
        benchmark_batches=batches,
    )
    trainer = parser.get_parsed_content("train#trainer")
    parts = [parser.get_parsed_content(k) for k in ("network", "critic", "optimizer", "critic_optimizer", "loss")]
    return trainer, parts, parser.get_parsed_content("clip"), batches


def _time_trainer(trainer, device) -> Clock:
    with Clock() as clock:
        trainer.run()  # one epoch over the fixed batches; a finished engine restarts from scratch
        _sync(device)
    return clock


def _time_plain(parts, clip, batches, device) -> Clock:
    network, critic, optimizer, critic_optimizer, loss_fn = parts
    with Clock() as clock:
        for b in batches:
            _plain_iteration(network, critic, optimizer, critic_optimizer, loss_fn, clip, b["image"], b["label"])
        _sync(device)
    return clock


def _per_iteration(clocks: list, iterations: int) -> dict:
    return {
        "wall_s": float(np.median([c.wall for c in clocks])) / iterations,
        "cpu_s": float(np.median([c.cpu for c in clocks])) / iterations,
    }


# ---------------------------------------------------------------------------------------------- sections
def training(
    widths: dict, batch: int, size: int, iterations: int, repeats: int, device, skip: str, regions: int = 3
) -> dict:
    """Trainer vs plain loop, interleaved; per-iteration medians and slices/s."""
    trainer, parts, clip, batches = _training_setup(
        widths, batch, size, regions, device, {"network_def#skip": skip}, count=iterations
    )
    _time_trainer(trainer, device)  # warm-up: allocator, oneDNN primitives
    _time_plain(parts, clip, batches, device)
    runs = {"trainer": [], "plain": []}
    for r in range(repeats):
        order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
        for name in order:
            clock = _time_trainer(trainer, device) if name == "trainer" else _time_plain(parts, clip, batches, device)
            runs[name].append(clock)
    out = {name: _per_iteration(clocks, iterations) for name, clocks in runs.items()}
    out["ratio_wall"] = out["trainer"]["wall_s"] / out["plain"]["wall_s"]
    out["ratio_cpu"] = out["trainer"]["cpu_s"] / out["plain"]["cpu_s"]
    # per-repeat ratios (each pair measured back to back): their median is the least load-sensitive figure
    out["ratio_pairs_median"] = float(np.median([t.wall / p.wall for t, p in zip(runs["trainer"], runs["plain"])]))
    out["slices_per_s"] = batch / out["trainer"]["wall_s"]
    out["slices_per_cpu_s"] = batch / out["trainer"]["cpu_s"]
    out.update(batch=batch, size=size, regions=regions, iterations=iterations, repeats=repeats, **widths)
    return out


def _write_brats_like_case(folder: str, frame=BRATS_FRAME, head=BRATS_HEAD) -> str:
    """A demo case in BraTS 2018-2021 layout, its head placed in a frame of zeros as a brain sits in BraTS."""
    import nibabel as nib

    from bundle.phantom import make_demo_case

    case = "BraTSLike_000"
    path = os.path.join(folder, case)
    if os.path.isfile(os.path.join(path, "done")):
        return folder
    os.makedirs(path, exist_ok=True)
    images, _ = make_demo_case(head, seed=0, index=0)
    offset = [(f - h) // 2 for f, h in zip(frame, head)]
    inner = tuple(slice(o, o + h) for o, h in zip(offset, head))
    for contrast, suffix in {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}.items():
        volume = np.zeros(frame, np.float32)
        volume[inner] = images[contrast]
        nib.save(nib.Nifti1Image(volume, np.eye(4)), os.path.join(path, f"{case}_{suffix}.nii.gz"))
    open(os.path.join(path, "done"), "w").close()
    return folder


def data_pipeline(work_dir: str, batches: int, num_workers: int, shape, crop_size, patch_size, cases: int) -> dict:
    """Slices/s of the training loader (cached volumes, many slices per visit) and of reloading per slice."""
    from bundle.demo import ensure_demo_data

    data = ensure_demo_data(os.path.join(work_dir, f"data_{'x'.join(map(str, shape))}"), num_cases=cases, shape=shape)
    out = {}
    for name in ("cached", "naive"):
        overrides = {
            "dataset_dir": data,
            "num_workers": num_workers,
            "crop_size": list(crop_size),
            "patch_size": list(patch_size),
            "train_datalist": "$@segan.datalist.load_datalist('', @dataset_dir, 'training')",
        }
        parser = _parser(TRAIN, overrides)
        per_batch = parser.get_parsed_content("slices_per_volume") * parser.get_parsed_content("volumes_per_batch")
        if name == "naive":  # each slice from a fresh load of its volume (8 a batch: the rate is per slice)
            parser.update(
                {"train#dataset#_target_": "Dataset", "slices_per_volume": 1, "volumes_per_batch": min(per_batch, 8)}
            )
            for key in ("cache_rate", "num_workers", "copy_cache"):
                parser["train"]["dataset"].pop(key, None)
        loader = parser.get_parsed_content("train#dataloader")  # a CacheDataset fills its cache here, untimed
        stream = _forever(loader)
        next(stream)  # warm-up: worker start-up
        count, n = 0, batches if name == "cached" else 1
        with Clock() as clock:
            for _ in range(n):
                count += next(stream)["image"].shape[0]
        out[name] = {
            "slices_per_s": count / clock.wall,
            "slices_per_cpu_s": count / max(clock.cpu, 1e-9),
            "slices": count,
        }
    out["cached_over_naive"] = out["cached"]["slices_per_s"] / out["naive"]["slices_per_s"]
    out.update(
        num_workers=num_workers, volume_shape=list(shape), crop_size=list(crop_size), patch_size=list(patch_size)
    )
    return out


def _forever(loader):
    while True:
        yield from loader


def _worker(spec: dict) -> dict:
    """One inference variant in this process: load -> NIfTI written, timed; with peak resident memory."""
    torch.set_num_threads(spec["threads"])
    if spec["variant"] == "naive":
        return _naive_inference(spec)
    parser = _parser(INFERENCE, {**spec["overrides"], "progress": False, "num_workers": 0})
    evaluator = parser.get_parsed_content("evaluator")
    with Clock() as clock:
        evaluator.run()
    return {"wall_s": clock.wall, "cpu_s": clock.cpu, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def _naive_inference(spec: dict) -> dict:
    """The loop a first implementation writes: full frame, one slice at a time, labels painted, NIfTI saved."""
    import nibabel as nib
    from monai.transforms import NormalizeIntensity

    from bundle.networks import SegANSegmentor

    overrides = spec["overrides"]
    network = SegANSegmentor(features=overrides["features"], skip=spec["skip"])
    network.load_state_dict(torch.load(overrides["ckpt_path"]))
    network.eval()
    case = os.path.join(overrides["dataset_dir"], "BraTSLike_000")
    with Clock() as clock:
        files = [os.path.join(case, f"BraTSLike_000_{s}.nii.gz") for s in ("t1ce", "t2", "flair")]
        reference = nib.load(files[0])
        image = np.stack([nib.load(f).get_fdata(dtype=np.float32) for f in files])
        image = torch.as_tensor(np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(image)))
        label = np.zeros(image.shape[1:], np.uint8)
        with torch.no_grad():
            for z in range(image.shape[-1]):
                maps = torch.sigmoid(network(image[None, ..., z]))[0] >= 0.5
                for r, value in enumerate((2, 1, 4)):
                    label[..., z][maps[r].numpy()] = value
        os.makedirs(overrides["output_dir"], exist_ok=True)
        nib.save(nib.Nifti1Image(label, reference.affine), os.path.join(overrides["output_dir"], "naive_seg.nii.gz"))
    return {"wall_s": clock.wall, "cpu_s": clock.cpu, "peak_rss_mb": _peak_rss_mb()}


def _run_worker(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"inference variant {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


INFERENCE_VARIANTS = {
    "bundle": {},  # the default: foreground crop, PyTorch
    "onnxruntime": {"backend": "onnxruntime"},  # the same, the network run by onnxruntime
    "full_frame": {"crop_foreground": False},
    "naive": None,
}
#: ``onnx_export``'s converter arguments (the README's command): traced, batch and slice size dynamic.
ONNX_CONVERTER = {
    "dynamo": False,
    "input_names": ["image"],
    "output_names": ["pred"],
    "dynamic_axes": {"image": {0: "batch", 2: "height", 3: "width"}, "pred": {0: "batch", 2: "height", 3: "width"}},
}


def inference(work_dir: str, widths: dict, skip: str, threads: int, repeats: int, variants, frame, head) -> dict:
    """One BraTS-sized case through each inference variant, each run in a fresh process, interleaved."""
    data = _write_brats_like_case(os.path.join(work_dir, f"case_{'x'.join(map(str, frame))}"), frame, head)
    root = os.path.join(work_dir, "bundle")
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    parser = _parser(INFERENCE, {"features": widths["features"], "network_def#skip": skip})
    torch.manual_seed(0)
    ckpt = os.path.join(root, "models", f"model_{skip}_{'_'.join(map(str, widths['features']))}.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    base = {
        "bundle_root": root,
        "dataset_dir": data,
        "output_dir": os.path.join(work_dir, "out"),
        "ckpt_path": ckpt,
        "features": widths["features"],
        "network_def#skip": skip,
        "device": "$torch.device('cpu')",
    }
    if "onnxruntime" in variants:
        from monai.bundle.scripts import onnx_export

        base["onnx_path"] = ckpt[: -len(".pt")] + ".onnx"
        onnx_export(
            net_id="network_def",
            filepath=base["onnx_path"],
            ckpt_file=ckpt,
            config_file=INFERENCE,
            meta_file=os.path.join(ROOT, "configs", "metadata.json"),
            use_trace=True,
            input_shape=[1, 3, 160, 160],
            converter_kwargs=ONNX_CONVERTER,
            features=widths["features"],
            **{"network_def#skip": skip},
        )
    runs = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants if r % 2 == 0 else list(variants)[::-1]:
            spec = {
                "variant": v,
                "threads": threads,
                "skip": skip,
                "overrides": {**base, **(INFERENCE_VARIANTS[v] or {})},
            }
            runs[v].append(_run_worker(spec))
            print(f"  inference {v}: {runs[v][-1]['wall_s']:.1f} s wall, {runs[v][-1]['cpu_s']:.1f} s CPU", flush=True)
    out = {v: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for v, rs in runs.items()}
    out["case"] = {"frame": list(frame), "head_box": list(head), "foreground_box": _foreground_box(data)}
    out.update(threads=threads, repeats=repeats, skip=skip, **widths)
    return out


def _foreground_box(data: str) -> list:
    import nibabel as nib

    volume = nib.load(os.path.join(data, "BraTSLike_000", "BraTSLike_000_t1.nii.gz")).get_fdata() != 0
    idx = np.argwhere(volume)
    return (idx.max(0) - idx.min(0) + 1).tolist()


def matmul_peak(threads: int, device, size: int = 2048, repeats: int = 5) -> dict:
    """Best float32 matmul throughput: GFLOP per wall second, and per CPU second on a CPU."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        with Clock() as clock:
            for _ in range(4):
                a @ b
            _sync(device)
        flop = 4 * 2 * size**3
        best_wall, best_cpu = max(best_wall, flop / clock.wall / 1e9), max(best_cpu, flop / max(clock.cpu, 1e-9) / 1e9)
    return {"gflops_wall": best_wall, "gflops_per_cpu_s": best_cpu, "size": size, "threads": threads}


def flops(widths: dict, size: int, skip: str, regions: int = 3) -> dict:
    """FLOPs per slice: segmentor forward, one critic forward, and one whole training iteration."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer, parts, clip, batches = _training_setup(widths, 1, size, regions, "cpu", {"network_def#skip": skip})
    network, critic = parts[0], parts[1]
    image, label = batches[0]["image"], batches[0]["label"]
    out = {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network.eval()(image)
    out["segmentor_forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        critic.eval().critics[0](image)
    out["critic_forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        _plain_iteration(*parts[:4], parts[4], clip, image, label)
    out["training_iteration"] = counter.get_total_flops()
    out.update(size=size, skip=skip, regions=regions, **widths)
    return out


def options(widths: dict, batch: int, size: int, threads: int, repeats: int, device, skip: str, compile: bool) -> dict:
    """CPU seconds per training iteration and per inference batch with each speed option, vs the default."""
    settings = {"default": {"channels_last": False}, "channels_last": {"channels_last": True}}
    if compile:  # inductor builds C++ kernels first: minutes on a small CPU
        settings["compile"] = {"compile": True, "channels_last": False}
    if torch.device(device).type == "cuda":
        settings["amp_bf16"] = {"amp": True, "amp_dtype": "bfloat16"}
        settings["amp_fp16"] = {"amp": True, "amp_dtype": "float16"}
    else:  # CPU autocast in bfloat16: emulated without AVX512-BF16/AMX, shown for what it costs
        settings["bf16_autocast_inference"] = {"_autocast": "bfloat16"}
    out = {}
    for name, opts in settings.items():
        autocast = opts.pop("_autocast", None) if "_autocast" in opts else None
        try:
            entry = {}
            if autocast is None:
                trainer, parts, clip, batches = _training_setup(
                    widths, batch, size, 3, device, {**opts, "network_def#skip": skip}, count=1
                )
                _time_trainer(trainer, device)  # warm-up (and compilation)
                clocks = [_time_trainer(trainer, device) for _ in range(repeats)]
                entry["train_cpu_s"] = float(np.median([c.cpu for c in clocks]))
                entry["train_wall_s"] = float(np.median([c.wall for c in clocks]))
                network = parts[0]
            else:
                _, parts, _, _ = _training_setup(widths, 1, size, 3, device, {"network_def#skip": skip}, count=1)
                network = parts[0]
            network.eval()
            x = torch.randn(batch, 3, size, size, device=device)
            if opts.get("channels_last"):
                x = x.to(memory_format=torch.channels_last)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                network(x)
                clocks = []
                for _ in range(repeats):
                    with Clock() as clock:
                        network(x)
                        _sync(device)
                    clocks.append(clock)
            entry["infer_cpu_s"] = float(np.median([c.cpu for c in clocks]))
            entry["infer_wall_s"] = float(np.median([c.wall for c in clocks]))
            out[name] = entry
        except Exception as error:  # an option this machine cannot run is reported, not fatal
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(f"  option {name}: {out[name]}", flush=True)
    base = out.get("default", {})
    for entry in out.values():
        for key in ("train_cpu_s", "infer_cpu_s"):
            if key in entry and key in base:
                entry[key.replace("_cpu_s", "_speedup")] = base[key] / entry[key]
    out.update(batch=batch, size=size, threads=threads, skip=skip, **widths)
    return out


def scaling(batches, sizes, regions, iterations: int, device, skip: str) -> dict:
    """Training CPU seconds per slice at demo widths against batch size, slice size and regions."""
    rows = []
    grid = [("batch", b, 64, 3) for b in batches] + [("size", 16, s, 3) for s in sizes]
    grid += [("regions", 16, 64, r) for r in regions]
    for axis, batch, size, count in grid:
        trainer, _, _, _ = _training_setup(
            DEMO_WIDTHS, batch, size, count, device, {"network_def#skip": skip}, count=iterations
        )
        _time_trainer(trainer, device)
        clock = _time_trainer(trainer, device)
        rows.append(
            {
                "axis": axis,
                "batch": batch,
                "size": size,
                "regions": count,
                "cpu_ms_per_slice": 1000 * clock.cpu / (iterations * batch),
                "wall_ms_per_slice": 1000 * clock.wall / (iterations * batch),
            }
        )
    return {"rows": rows, "skip": skip, **DEMO_WIDTHS}


# ---------------------------------------------------------------------------------------------- report
def _machine(threads: int, device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import monai

    info["monai"] = monai.__version__
    return info


def _table(results: dict) -> str:
    rows = [("measure", "value")]
    t = results.get("training", {})
    for name in ("demo", "paper"):
        if name in t:
            r = t[name]
            rows.append(
                (
                    f"training {name} widths, batch {r['batch']} of {r['size']}x{r['size']}: trainer / plain loop",
                    f"{r['ratio_pairs_median']:.3f} (wall, paired) {r['ratio_cpu']:.3f} (CPU)",
                )
            )
            rows.append(
                (
                    f"training {name} widths: slices/s",
                    f"{r['slices_per_s']:.1f} wall, {r['slices_per_cpu_s']:.1f} per CPU-s",
                )
            )
    if "data" in results:
        d = results["data"]
        rows.append(("data pipeline, cached: slices/s", f"{d['cached']['slices_per_s']:.0f}"))
        rows.append(("data pipeline, reload per slice: slices/s", f"{d['naive']['slices_per_s']:.0f}"))
    if "data_over_training" in results:
        rows.append(("data pipeline / paper-width training slices/s", f"{results['data_over_training']:.0f}x"))
    if "inference" in results:
        i = results["inference"]
        for v in INFERENCE_VARIANTS:
            if v in i:
                rows.append(
                    (
                        f"inference one {'x'.join(map(str, i['case']['frame']))} case: {v}",
                        f"{i[v]['wall_s']:.1f} s wall, {i[v]['cpu_s']:.1f} s CPU, {i[v]['peak_rss_mb']:.0f} MB peak",
                    )
                )
    if "flops" in results:
        f = results["flops"]
        rows.append(
            (
                f"GFLOP per {f['size']}x{f['size']} slice: segmentor fwd / critic fwd / training iteration",
                f"{f['segmentor_forward'] / 1e9:.2f} / {f['critic_forward'] / 1e9:.2f} / {f['training_iteration'] / 1e9:.2f}",
            )
        )
    if "peak" in results:
        p = results["peak"]
        rows.append(
            ("float32 matmul peak", f"{p['gflops_wall']:.0f} GFLOP/s wall, {p['gflops_per_cpu_s']:.0f} per CPU-s")
        )
    for key, label in (("training_peak_fraction", "training"), ("inference_peak_fraction", "inference")):
        if key in results:
            rows.append((f"{label}: fraction of matmul peak (per CPU-s)", f"{results[key]:.2f}"))
    if "options" in results:
        for name, entry in results["options"].items():
            if isinstance(entry, dict) and ("train_speedup" in entry or "infer_speedup" in entry or "error" in entry):
                value = entry.get("error") or "train x{:.2f}, inference x{:.2f}".format(
                    entry.get("train_speedup", float("nan")), entry.get("infer_speedup", float("nan"))
                )
                rows.append((f"option {name} (CPU time vs default)", value))
    if "scaling" in results:
        for r in results["scaling"]["rows"]:
            rows.append(
                (
                    f"scaling {r['axis']}: batch {r['batch']}, {r['size']}x{r['size']}, {r['regions']} regions",
                    f"{r['cpu_ms_per_slice']:.1f} CPU-ms per slice",
                )
            )
    return "\n".join(["| measure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows[1:]])


def benchmark(
    output: str = "eval/benchmark.json",
    work_dir: str = "benchmark_data",
    quick: bool = False,
    device: str = "cpu",
    threads: int = 2,
    repeats: int = 3,
    train_batch: int = 2,
    skip: str | None = None,
    compile: bool = False,
    inference_repeats: int = 1,
    sections: str | list[str] = ("training", "data", "inference", "flops", "options", "scaling"),
) -> dict:
    """Run the sections, print the table, write ``output`` (JSON); return the results.

    Args:
        output: JSON file written (relative to the bundle root unless absolute).
        work_dir: where the synthetic cases and random weights go (kept between runs).
        quick: tiny sizes and one repeat: checks that everything runs, in seconds.
        device: ``cpu`` or ``cuda``.
        threads: torch threads (and threads of each inference process).
        repeats: timed repeats of each interleaved comparison.
        inference_repeats: runs of each inference variant (interleaved when more than one; each is a whole case).
        train_batch: slices per training batch at paper widths (the paper's 64 on a GPU).
        skip: the segmentor's skip connections, ``add`` or ``cat``; default: ``network_def#skip`` of train.json.
        compile: also time ``compile: true`` in the options section (its first call compiles: minutes on a CPU).
        sections: which sections to run.
    """
    torch.set_num_threads(threads)
    sections = [sections] if isinstance(sections, str) else list(sections)
    output = output if os.path.isabs(output) else os.path.join(ROOT, output)
    work_dir = work_dir if os.path.isabs(work_dir) else os.path.join(ROOT, work_dir)
    os.makedirs(work_dir, exist_ok=True)
    skip = skip or _parser(TRAIN, {}).get_parsed_content("network_def#skip")
    tiny = {"features": [4, 8, 16, 32], "critic_features": [4, 8, 16]}
    paper = tiny if quick else PAPER_WIDTHS
    demo = tiny if quick else DEMO_WIDTHS
    repeats = 1 if quick else repeats
    results = {"machine": _machine(threads, device), "quick": quick, "skip": skip}
    start = time.perf_counter()

    if "training" in sections:
        print("training: trainer vs plain loop, interleaved", flush=True)
        results["training"] = {
            "demo": training(demo, 4 if quick else 16, 32 if quick else 64, 2, repeats, device, skip),
            "paper": training(paper, 2 if quick else train_batch, 32 if quick else 160, 1, repeats, device, skip),
        }
    if "data" in sections:
        print("data pipeline", flush=True)
        shape, crop, patch = (
            ((48, 48, 24), (48, 48, 24), (32, 32)) if quick else ((192, 192, 128), (180, 180, 128), (160, 160))
        )
        results["data"] = data_pipeline(work_dir, 2 if quick else 20, 0, shape, crop, patch, cases=2 if quick else 4)
    if "data" in results and "training" in results:  # does loading keep up with the paper-width trainer?
        results["data_over_training"] = (
            results["data"]["cached"]["slices_per_s"] / results["training"]["paper"]["slices_per_s"]
        )
    if "inference" in sections:
        print("inference: one case per process, variants interleaved", flush=True)
        frame, head = ((64, 64, 28), (48, 52, 24)) if quick else (BRATS_FRAME, BRATS_HEAD)
        results["inference"] = inference(
            work_dir, paper, skip, threads, inference_repeats, list(INFERENCE_VARIANTS), frame, head
        )
    if "flops" in sections:
        print("flops and matmul peak", flush=True)
        results["flops"] = flops(paper, 32 if quick else 160, skip)
        results["peak"] = matmul_peak(threads, device, size=256 if quick else 2048)
        peak = results["peak"]["gflops_per_cpu_s"] * 1e9
        if "training" in results:
            r = results["training"]["paper"]
            per_slice = results["flops"]["training_iteration"] * (r["size"] / results["flops"]["size"]) ** 2
            results["training_peak_fraction"] = per_slice * r["slices_per_cpu_s"] / peak
        if "inference" in results:
            i = results["inference"]
            flops_full = _segmentor_flops(paper, skip, i["case"]["frame"][:2]) * i["case"]["frame"][2]
            results["inference_full_frame_gflop"] = flops_full / 1e9
            results["inference_peak_fraction"] = flops_full / i["full_frame"]["cpu_s"] / peak
    if "options" in sections:
        print("speed options", flush=True)
        results["options"] = options(
            demo if quick else paper, 2, 32 if quick else 160, threads, repeats, device, skip, compile
        )
    if "scaling" in sections:
        print("scaling", flush=True)
        results["scaling"] = scaling(
            [2] if quick else [8, 16, 32],
            [32] if quick else [32, 64, 128],
            [1] if quick else [1, 3, 5],
            1,
            device,
            skip,
        )
    results["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(_table(results))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    from bundle.files import atomic_path

    with atomic_path(output, ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    print(f"wrote {output} ({results['seconds']:.0f} s)")
    return results


def _segmentor_flops(widths: dict, skip: str, size) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from bundle.networks import SegANSegmentor

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        SegANSegmentor(features=widths["features"], skip=skip).eval()(torch.zeros(1, 3, *size))
    return counter.get_total_flops()


def main(worker: str | None = None, report: str | None = None, **kwargs) -> None:
    """Command-line entry: see :func:`benchmark`; ``--report <json>`` prints the table of an earlier run
    (``--worker`` is internal: one inference variant)."""
    if report is not None:
        with open(report, encoding="utf-8") as f:
            print(_table(json.load(f)))
        return
    if worker is not None:
        print(json.dumps(_worker(json.loads(worker) if isinstance(worker, str) else worker)))
        return
    benchmark(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
