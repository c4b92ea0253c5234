"""A round of reliability probes (docs/reliability.md): each probe spoils one thing a new user could get wrong,
runs the bundle's inference, evaluation or training on it, and is classified

* ``clean``: a clear error naming the file or key and what to do, or the correct result;
* ``silent-wrong``: exit 0 with a wrong or empty result;
* ``cryptic``: an error that names neither the file nor the key;
* ``leftover``: a refused run that still left an output file behind.

Usage: ``OMP_NUM_THREADS=1 python scripts/reliability_probes.py --work_dir /tmp/probes`` (a few minutes on two
CPU cores: a tiny model is trained once on tiny demo data, then every probe runs on copies of it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = {
    "features": [4, 8, 16, 32],
    "critic_features": [4, 8, 16],
    "crop_size": [32, 32, 12],
    "patch_size": [32, 32],
    "slices_per_volume": 4,
    "volumes_per_batch": 2,
    "val_batch_slices": 8,
    "num_workers": 0,
    "max_epochs": 2,
    "val_interval": 1,
    "progress": False,
}
INFER = {k: TINY[k] for k in ("features", "num_workers", "progress")}
MODALITIES = ("t1", "t1ce", "t2", "flair")


def _messages(error: BaseException) -> str:
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return "\n".join(f"{type(e).__name__}: {e}" for e in seen)


def _rewrite(path, array=None, affine=None):
    image = nib.load(str(path))
    array = np.asarray(image.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), str(path))


def _files(folder) -> list[str]:
    return (
        sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        if Path(folder).exists()
        else []
    )


class Probes:
    def __init__(self, work: Path):
        from bundle.demo import make_demo_dataset

        self.work = work
        self.demo = work / "demo"
        if not self.demo.exists():
            make_demo_dataset(str(self.demo), num_cases=6, shape=(40, 40, 24), seed=3)
        self.bundle = work / "bundle"
        self.model = self.bundle / "models" / "model.pt"
        if not self.model.exists():
            self.train(self.bundle, self.demo)
        self.results: list[tuple[str, str, str]] = []
        self.count = 0

    # runners ------------------------------------------------------------------------------------------------------
    def train(self, root, data, **over):
        from monai.bundle.scripts import run

        run(
            "training",
            config_file=str(ROOT / "configs" / "train.json"),
            bundle_root=str(root),
            dataset_dir=str(data),
            **{**TINY, **over},
        )

    def infer(self, data, out, **over):
        from monai.bundle.scripts import run

        over.setdefault("ckpt_path", str(self.model))
        run(
            config_file=str(ROOT / "configs" / "inference.json"),
            dataset_dir=str(data),
            output_dir=str(out),
            **{**INFER, **over},
        )

    def evaluate(self, data, out, **over):
        from monai.bundle.scripts import run

        over.setdefault("ckpt_path", str(self.model))
        run(
            config_file=[str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "evaluate.json")],
            dataset_dir=str(data),
            output_dir=str(out),
            **{**INFER, **over},
        )

    def fresh(self, cases=("Demo_000",)) -> Path:
        self.count += 1
        folder = self.work / f"p{self.count:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        for case in cases:
            shutil.copytree(self.demo / case, folder / "data" / case)
        return folder

    def probe(self, name, action, expect_error=True, names=(), check=None, out=None):
        """Run ``action``; classify by whether it failed, whether the message names one of ``names``."""
        try:
            action()
        except BaseException as error:  # noqa: B036 - a probe records every outcome, SystemExit included
            text = _messages(error)
            left = out is not None and any(not f.startswith(".") for f in _files(out))
            if not expect_error:
                verdict = "cryptic"
            elif left:
                verdict = "leftover"
            elif names and not any(str(n) in text for n in names):
                verdict = "cryptic"
            else:
                verdict = "clean"
            lines = [
                line
                for line in text.splitlines()
                if line.strip() and not line.startswith(("RuntimeError: Failed", '"$'))
            ]
            errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
            named = [line for line in errors if any(str(n) in line for n in names)] or errors
            self.results.append((name, verdict, (named or lines or [""])[0][:300]))
            return
        if expect_error:
            self.results.append((name, "silent-wrong", "exit 0"))
        else:
            ok = check() if check else True
            self.results.append((name, "clean" if ok else "silent-wrong", "correct result" if ok else "wrong result"))

    # the probes ---------------------------------------------------------------------------------------------------
    def run_all(self):
        p = self.fresh()
        self.probe(
            "good case, inference",
            lambda: self.infer(p / "data", p / "out"),
            expect_error=False,
            check=lambda: (p / "out" / "Demo_000_seg.nii.gz").exists(),
        )

        for label, spoil in [
            ("float label x 1.0000001", lambda a: a.astype(np.float32) * np.float32(1.0000001)),
            ("float label x 0.5 (interpolated)", lambda a: a.astype(np.float32) * 0.5),
            ("label values of another convention (x 10)", lambda a: a.astype(np.uint8) * 10),
            ("label with NaN", lambda a: np.where(a > 0, np.nan, 0).astype(np.float32)),
        ]:
            p = self.fresh(("Demo_000", "Demo_001", "Demo_002"))
            for case in ("Demo_000", "Demo_001", "Demo_002"):
                f = p / "data" / case / f"{case}_seg.nii.gz"
                _rewrite(f, spoil(np.asarray(nib.load(str(f)).dataobj)))
            good = label.startswith("float label x 1.0")
            self.probe(
                f"evaluation, {label}",
                lambda: self.evaluate(p / "data", p / "out", ckpt_path=str(self._model_copy(p))),
                expect_error=not good,
                names=("seg.nii.gz",),
                check=lambda: abs(self._dice(p / "out") - self._reference_dice()) < 1e-6,
            )

        p = self.fresh(("Demo_000", "Demo_001", "Demo_002"))
        for case in ("Demo_000", "Demo_001", "Demo_002"):
            f = p / "data" / case / f"{case}_seg.nii.gz"
            _rewrite(f, np.zeros(nib.load(str(f)).shape, np.uint8))
        self.probe(
            "training, no foreground in any label",
            lambda: self.train(p / "b", p / "data"),
            names=("training label map",),
        )

        flat = self.fresh(())
        (flat / "data").mkdir(parents=True)
        for f in (self.demo / "Demo_000").iterdir():
            shutil.copy(f, flat / "data" / f.name)
        self.probe(
            "output_dir = flat BraTS dataset_dir",
            lambda: self.infer(flat / "data", flat / "data"),
            names=("dataset_dir",),
        )
        p = self.fresh()
        self.probe(
            "output_dir = a case folder",
            lambda: self.infer(p / "data", p / "data" / "Demo_000"),
            names=("dataset_dir",),
        )
        p = self.fresh()
        self.probe(
            "output_postfix 'flair' into the case folder",
            lambda: self.infer(p / "data", p / "data" / "Demo_000", output_postfix="flair"),
            names=("flair",),
        )

        p = self.fresh()
        for m in MODALITIES:
            f = p / "data" / "Demo_000" / f"Demo_000_{m}.nii.gz"
            _rewrite(f, np.asarray(nib.load(str(f)).dataobj)[..., None])
        ref = self.fresh()
        self.probe(
            "modality files (X, Y, Z, 1)",
            lambda: (self.infer(p / "data", p / "out"), self.infer(ref / "data", ref / "out")),
            expect_error=False,
            check=lambda: self._same(p / "out", ref / "out"),
        )

        p = self.fresh(("Demo_000", "Demo_001", "Demo_002", "Demo_003"))
        for case in ("Demo_000", "Demo_001", "Demo_002", "Demo_003"):
            f = p / "data" / case / f"{case}_seg.nii.gz"
            image = nib.load(str(f))
            flipped = image.affine.copy()
            flipped[:, 0] *= -1
            flipped[:3, 3] += image.affine[:3, 0] * (image.shape[0] - 1)
            _rewrite(f, np.asarray(image.dataobj)[::-1].copy(), flipped)
        self.probe(
            "evaluation, labels stored flipped",
            lambda: self.evaluate(p / "data", p / "out", ckpt_path=str(self._model_copy(p))),
            names=("seg.nii.gz",),
        )
        for what, change in [("translated 5 mm", (1, 3, 5.0)), ("voxel size 2 mm", (0, 0, 1.0))]:
            p = self.fresh()
            f = p / "data" / "Demo_000" / "Demo_000_t2.nii.gz"
            affine = nib.load(str(f)).affine.copy()
            affine[change[0], change[1]] += change[2]
            _rewrite(f, affine=affine)
            self.probe(
                f"one modality {what}",
                lambda: self.infer(p / "data", p / "out", continue_on_error=False),
                names=("t2.nii.gz",),
                out=p / "out",
            )

        store = self.fresh(("Demo_000", "Demo_001", "Demo_002"))
        links = store / "links"
        links.mkdir()
        for case in ("Demo_000", "Demo_001", "Demo_002"):
            (links / case).symlink_to(store / "data" / case, target_is_directory=True)
        self.probe(
            "symlinked case folders",
            lambda: self.infer(links, store / "out"),
            expect_error=False,
            check=lambda: len(_files(store / "out")) == 3,
        )

        p = self.fresh(tuple(f"Demo_00{i}" for i in range(6)))
        os.remove(p / "data" / "Demo_001" / "Demo_001_seg.nii.gz")
        self.probe(
            "evaluation from a folder, a label missing, no split record",
            lambda: self.evaluate(p / "data", p / "out", ckpt_path=str(self._model_copy(p))),
            names=("Demo_001",),
        )
        p = self.fresh(tuple(f"Demo_00{i}" for i in range(6)))
        record = json.loads((self.model.parent / "datalist.json").read_text())
        listed = p / "list.json"
        listed.write_text(json.dumps({"validation": record["training"][:2]}))
        self.probe(
            "evaluation of a datalist holding training cases",
            lambda: self.evaluate(self.demo, p / "out", data_list_file_path=str(listed)),
            names=(record["training"][0]["case"],),
        )
        self.probe(
            "evaluation of the recorded validation cases",
            lambda: self.evaluate(self.demo, p / "out2"),
            expect_error=False,
            check=lambda: self._dice(p / "out2") > 0,
        )

        for what, array in [
            ("constant", lambda s: np.full(s, 5, np.float32)),
            ("zeros", lambda s: np.zeros(s, np.float32)),
            ("one voxel", lambda s: np.pad(np.ones((1, 1, 1), np.float32), [(0, n - 1) for n in s])),
        ]:
            p = self.fresh()
            f = p / "data" / "Demo_000" / "Demo_000_t1ce.nii.gz"
            _rewrite(f, array(nib.load(str(f)).shape))
            self.probe(
                f"t1ce {what}",
                lambda: self.infer(p / "data", p / "out", continue_on_error=False),
                names=("t1ce.nii.gz",),
                out=p / "out",
            )

        bad_overrides = [
            ("max_epochs", "ten"),
            ("max_epochs", 0),
            ("max_epochs", 2.5),
            ("crop_size", [180, 180]),
            ("patch_size", [160]),
            ("regions", {}),
            ("regions", {"tumor": []}),
            ("label_convention", "brats2024"),
            ("modalities", ["t1c", "t1c"]),
            ("modalities", ["dwi"]),
            ("learning_rate", -1.0),
            ("val_interval", 0),
            ("volumes_per_batch", 0),
            ("cache_rate", 2.0),
            ("normalization", "minmax"),
            ("dice_weight", -1.0),
            ("resume", "maybe"),
            ("context_slices", -1),
        ]
        for key, value in bad_overrides:
            p = self.fresh(("Demo_000", "Demo_001", "Demo_002"))
            self.probe(
                f"training --{key} {value!r}",
                lambda: self.train(p / "b", p / "data", **{key: value}),
                names=(f"`{key}`",),
                out=p / "b" / "models",
            )
        for key, value in [
            ("threshold", 1.5),
            ("threshold", 0),
            ("sw_batch_size", 0),
            ("spatial_fit", "stretch"),
            ("output_format", "png"),
            ("backend", "tensorrt"),
            ("continue_on_error", "sometimes"),
            ("foreground_margin", -4),
            ("label_convention", "brats2024"),
        ]:
            p = self.fresh()
            self.probe(
                f"inference --{key} {value!r}",
                lambda: self.infer(p / "data", p / "out", **{key: value}),
                names=(f"`{key}`",),
                out=p / "out",
            )

        p = self.fresh()
        self.probe("dataset_dir missing", lambda: self.infer(p / "nothing", p / "out"), names=("nothing",))
        p = self.fresh()
        (p / "data" / "Demo_000" / "Demo_000_t2.nii.gz").unlink()
        self.probe("a modality missing", lambda: self.infer(p / "data", p / "out"), names=("t2",))
        p = self.fresh()
        f = p / "data" / "Demo_000" / "Demo_000_flair.nii.gz"
        f.write_bytes(f.read_bytes()[:1000])
        self.probe(
            "truncated flair",
            lambda: self.infer(p / "data", p / "out", continue_on_error=False),
            names=("flair.nii.gz",),
            out=p / "out",
        )
        p = self.fresh()
        self.probe(
            "ckpt_path missing", lambda: self.infer(p / "data", p / "out", ckpt_path=str(p / "no.pt")), names=("no.pt",)
        )
        p = self.fresh()
        (p / "data" / "screens").mkdir()
        (p / "data" / "labels").mkdir()
        (p / "data" / "screens" / "Demo_000.png").write_bytes(b"\x89PNG")
        (p / "data" / "labels" / "Demo_000.png").write_bytes(b"\x89PNG")
        self.probe(
            "BraTS folder with labels/ and screens/*.png",
            lambda: self.infer(p / "data", p / "out"),
            expect_error=False,
            check=lambda: _files(p / "out") == ["Demo_000_seg.nii.gz"],
        )
        p = self.fresh()
        states = self.bundle / "checkpoints"
        state = next(iter(sorted(states.glob("*.pt"))), None)
        if state is not None:
            self.probe(
                "a training state given as --ckpt_path",
                lambda: self.infer(p / "data", p / "out", ckpt_path=str(state)),
                names=("training state",),
            )
        return self.results

    def _reference_dice(self) -> float:
        """Dice of the untouched Demo_000..002 with a model that has no split record (the 9:1 split of them)."""
        if not hasattr(self, "_reference"):
            p = self.fresh(("Demo_000", "Demo_001", "Demo_002"))
            self.evaluate(p / "data", p / "out", ckpt_path=str(self._model_copy(p)))
            self._reference = self._dice(p / "out")
        return self._reference

    def _model_copy(self, p: Path) -> Path:
        target = p / "models" / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.model, target)
        return target

    @staticmethod
    def _dice(out: Path) -> float:
        """Mean Dice over the regions in the evaluation's ``metrics_summary.json`` (0 if there is none)."""
        summary = out / "metrics_summary.json"
        if not summary.exists():
            return 0.0
        regions = json.loads(summary.read_text())["metrics"]["dice"].values()
        return float(np.mean([r["mean"] or 0.0 for r in regions]))

    @staticmethod
    def _same(a: Path, b: Path) -> bool:
        fa, fb = _files(a), _files(b)
        return fa == fb and all(
            np.array_equal(np.asarray(nib.load(str(a / f)).dataobj), np.asarray(nib.load(str(b / f)).dataobj))
            for f in fa
        )


def main(work_dir: str = "/tmp/reliability_probes", report: str = "") -> None:
    import logging

    logging.disable(logging.WARNING)
    probes = Probes(Path(work_dir))
    results = probes.run_all()
    counts = {}
    for _, verdict, _ in results:
        counts[verdict] = counts.get(verdict, 0) + 1
    lines = [f"| {name} | {verdict} | {detail.replace('|', '/')} |" for name, verdict, detail in results]
    text = "\n".join(["| probe | verdict | first line |", "| --- | --- | --- |", *lines])
    print(text)
    print(f"{len(results)} probes: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    if report:
        Path(report).write_text(text + "\n")


if __name__ == "__main__":
    fire.Fire(main)
