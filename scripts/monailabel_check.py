"""Serve and train the bundle with a real MONAI Label 0.8.5 server, offline, on 127.0.0.1, and check the contract.

    python scripts/monailabel_check.py --workdir /tmp/monailabel_check
    python scripts/monailabel_check.py --ckpt_path /tmp/w24/models/model.pt --label_convention brats2024

1. Creates MONAI Label's own virtualenv if it is missing (``--venv``; it pulls its own packages, pinned as in
   README.md: ``monailabel==0.8.5 "pydicom<3" "dicomweb-client==0.59.1" "pynetdicom<3"``, with torch constrained to
   the version of this interpreter so no CUDA build is downloaded; then ``torchvision==0.16.2`` without
   dependencies, since PyPI's CUDA torchvision does not import beside a CPU torch).
2. Copies the ``monaibundle`` sample app and puts the bundle there as ``scripts/package_bundle.py`` packages it:
   this checkout's configs and code, the weights (``models/model.pt``) with their recipe
   (``models/model_recipe.json``), and ``configs/metadata.json`` rewritten from that recipe (input channels, output
   regions, label values and names); writes demo studies as MONAI Label's datastore wants them: one 4D NIfTI per
   case in ``image_modalities_4d`` order, labels in ``labels/final``, in the label convention of the weights
   (``--label_convention``, default the recipe's: ``brats2024`` writes post-treatment cases with a resection
   cavity). One more study is the first case stored otherwise (``REORIENTED``: its axes permuted so that it is
   stored in sagittal slices, posterior first, with the affine adjusted so it is the same anatomy in world space).
3. Starts ``monailabel start_server`` on 127.0.0.1, checks that ``/info/`` lists the labels of the packaged
   metadata, that ``/infer/segan`` returns the same label map, voxel for voxel, as the bundle's own inference
   (``monai.bundle run`` of ``configs/inference.json`` on the same file) with only those label values, both for
   the first case and for the reoriented study (whose map must be on its own grid: shape and affine, and, carried
   back, equal to the first case's), runs a 1-epoch ``/train/segan`` and checks that it rewrote
   ``models/model.pt`` (and that ``/infer`` still works), then stops the server by its process id. Prints each
   check; exits non-zero if one fails.

Needs trained weights with their recipe (``--ckpt_path``, default ``models/model.pt``: run the demo training first,
with ``--label_convention brats2024`` for post-treatment weights).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from bundle.checkpoints import read_recipe, recipe_path  # noqa: E402
from bundle.constants import LABEL_NAMES, MSD_MODALITIES  # noqa: E402
from bundle.demo import _file_names, make_demo_dataset  # noqa: E402

MONAILABEL = ["monailabel==0.8.5", "pydicom<3", "dicomweb-client==0.59.1", "pynetdicom<3"]
TORCHVISION_FALLBACK = "torchvision==0.16.2"
NAME = "segan"
#: how the extra study stores the first case: its spatial axes in this order, then these stored axes flipped
REORIENT_AXES, REORIENT_FLIPS = (1, 2, 0), (0,)  # RAS stored as A, S, R (sagittal slices), then A -> P
REORIENTED = "Reoriented_000"


def _say(message: str) -> None:
    print(f"[monailabel_check] {message}", flush=True)


def ensure_venv(venv: Path) -> Path:
    """MONAI Label's virtualenv at ``venv`` (created and installed if missing); returns its ``bin`` folder."""
    binary = venv / "bin"
    if (binary / "monailabel").is_file():
        _say(f"using MONAI Label's virtualenv {venv}")
        return binary
    import torch

    torch_version = torch.__version__.split("+")[0]
    _say(f"creating {venv} and installing {' '.join(MONAILABEL)} with torch=={torch_version} (several minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    subprocess.run(
        [str(binary / "pip"), "install", "-c", str(constraints), *MONAILABEL, f"torch=={torch_version}"], check=True
    )
    # PyPI's torchvision (0.28, which that resolves) is a CUDA build: beside a CPU torch its operators do not load
    # and `import torchvision` fails ("RuntimeError: operator torchvision::nms does not exist"), which stops
    # MONAI Label's server at start. torchvision 0.16 guards its operator registrations, so it imports (with a
    # warning) over torch 2.13; MONAI Label only uses its pure-Python image utilities.
    subprocess.run([str(binary / "pip"), "install", "--no-deps", TORCHVISION_FALLBACK], check=True)
    return binary


def _sample_app(venv: Path) -> Path:
    found = sorted(venv.glob("**/sample-apps/monaibundle/main.py"))
    if not found:
        raise FileNotFoundError(f"no monaibundle sample app under {venv}: is monailabel installed there?")
    return found[0].parent


def _package_module():
    """``scripts/package_bundle.py``, imported from its file (``scripts/`` is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("package_bundle", ROOT / "scripts" / "package_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_bundle(app: Path, ckpt_path: Path, ensemble: list[str] | None = None) -> tuple[Path, dict]:
    """The bundle in ``<app>/model/segan`` as ``scripts/package_bundle.py`` packages it; its folder and the
    metadata written there (``network_data_format`` from the weights' recipe, which ``/info`` lists). With
    ``ensemble``, its members packed as one ``models/model.pt`` and an ``inference.json`` that builds them, as
    ``package_bundle.py --ensemble`` ships them."""
    package = _package_module()
    target = app / "model" / NAME
    # configs/datalist* name local data and stay out; bundle/datalist.py is code and goes in
    for part in ("configs", "bundle", "docs"):
        ignore = ("__pycache__", "datalist*") if part == "configs" else ("__pycache__",)
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns(*ignore))
    shutil.copy(ROOT / "LICENSE", target)
    (target / "models").mkdir()
    if ensemble:
        recipe = package.pack(ensemble, str(target / "models" / "model.pt"))
        inference = package._ensemble_inference(ROOT / "configs" / "inference.json", recipe)
        (target / "configs" / "inference.json").write_bytes(inference)
    else:
        shutil.copy(ckpt_path, target / "models" / "model.pt")
        shutil.copy(recipe_path(str(ckpt_path)), target / "models" / "model_recipe.json")
        recipe = package._check_weights(target / "models" / "model.pt")  # refuses weights without their recipe
    metadata = package._metadata(json.loads((ROOT / "configs" / "metadata.json").read_text()), recipe)
    (target / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    return target, metadata


def _reorient(array, affine):
    """``array`` (spatial axes first) and ``affine`` stored as ``REORIENT_AXES`` / ``REORIENT_FLIPS`` say: the
    same voxels at the same world positions."""
    import numpy as np

    order = list(REORIENT_AXES) + list(range(3, array.ndim))
    array = array.transpose(order)
    affine = affine.copy()
    affine[:, :3] = affine[:, list(REORIENT_AXES)]
    for axis in REORIENT_FLIPS:
        affine[:3, 3] += affine[:3, axis] * (array.shape[axis] - 1)
        affine[:3, axis] *= -1
        array = np.flip(array, axis)
    return np.ascontiguousarray(array), affine


def _restore(array):
    """An array (spatial axes first) stored as :func:`_reorient` stores it, back in the original axes."""
    import numpy as np

    for axis in REORIENT_FLIPS:
        array = np.flip(array, axis)
    order = [int(axis) for axis in np.argsort(REORIENT_AXES)] + list(range(3, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def _studies(folder: Path, num_cases: int, label_convention: str) -> list[str]:
    """Demo studies of ``label_convention`` in MONAI Label's datastore layout, and the first case reoriented
    (``REORIENTED``, with its label reoriented the same way); their ids, the reoriented one last."""
    import nibabel as nib
    import numpy as np

    demo = folder.parent / "demo"
    make_demo_dataset(str(demo), num_cases=num_cases, shape=(96, 96, 64), seed=7, label_convention=label_convention)
    (folder / "labels" / "final").mkdir(parents=True)
    ids = []
    for case in sorted(p.name for p in demo.iterdir() if p.is_dir()):
        names = _file_names(case, label_convention)
        images = [nib.load(str(demo / case / names[m])) for m in MSD_MODALITIES]
        stacked = np.stack([np.asarray(i.get_fdata(dtype=np.float32)) for i in images], axis=-1)
        nib.save(nib.Nifti1Image(stacked, images[0].affine), str(folder / f"{case}.nii.gz"))
        shutil.copy(demo / case / names["seg"], folder / "labels" / "final" / f"{case}.nii.gz")
        ids.append(case)
    for source, labelled in ((folder, False), (folder / "labels" / "final", True)):
        image = nib.load(str(source / f"{ids[0]}.nii.gz"))
        array, affine = _reorient(np.asarray(image.dataobj), image.affine)
        nib.save(
            nib.Nifti1Image(array.astype(np.uint8) if labelled else array, affine), str(source / f"{REORIENTED}.nii.gz")
        )
    return ids + [REORIENTED]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 900) -> bytes:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


def _multipart(fields: dict[str, str]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _infer(base: str, image_id: str, out: Path) -> Path:
    body, headers = _multipart({"params": json.dumps({"device": "cpu"})})
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    out.write_bytes(_request(f"{base}/infer/{NAME}?{query}", body, headers))
    return out


def _wait_for_server(base: str, server: subprocess.Popen, log: Path, timeout: float) -> dict:
    start = time.time()
    while time.time() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}; see {log}")
        try:
            return json.loads(_request(f"{base}/info/", timeout=10))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(3)
    raise TimeoutError(f"no answer from {base}/info/ after {timeout:.0f} s; see {log}")


def _own_inference(bundle_root: Path, image: Path, out_dir: Path, cwd: Path) -> None:
    """The bundle's own inference (``monai.bundle run`` of ``configs/inference.json``) on one 4D ``image``."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += [str(bundle_root / "configs" / "inference.json"), "--bundle_root", str(bundle_root)]
    command += ["--dataset_dir", str(image), "--output_dir", str(out_dir), "--progress", "false"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


#: where the MONAI Label server's virtual environment is kept, and the weights it serves, unless given
DEFAULT_VENV = str(Path.home() / ".cache" / "segan_monailabel" / "venv")
DEFAULT_CKPT = str(ROOT / "models" / "model.pt")


def main(
    workdir: str = "/tmp/segan_monailabel_check",
    venv: str = DEFAULT_VENV,
    ckpt_path: str = DEFAULT_CKPT,
    num_cases: int = 3,
    start_timeout: float = 900,
    label_convention: str = "",
    ensemble: list[str] | str = "",
) -> None:
    """Run every check; raise ``SystemExit(1)`` if one fails. ``label_convention`` (default: the one recorded in
    the weights' recipe) is the demo studies' and must be the weights'. ``ensemble`` (weight files) serves their
    packed ensemble instead of ``ckpt_path`` (``package_bundle.py --ensemble``); such a bundle does not train, so
    ``/train`` is not tried."""
    import nibabel as nib
    import numpy as np
    import torch

    members = [ensemble] if isinstance(ensemble, str) and ensemble else list(ensemble or [])
    ckpt = Path(members[0] if members else ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"no trained weights at {ckpt}: train first (python -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/demo.json']\"), or pass --ckpt_path."
        )
    recipe = read_recipe(str(ckpt))
    if not recipe:
        raise FileNotFoundError(f"no recipe beside {ckpt} ({recipe_path(str(ckpt))}): MONAI Label serves both.")
    trained_for = recipe.get("label_convention", "brats")
    convention = label_convention or trained_for
    if convention != trained_for or convention not in LABEL_NAMES:
        raise ValueError(
            f"--label_convention {convention!r}: the weights {ckpt} were trained with label_convention "
            f"{trained_for!r} (their recipe); pass weights trained with --label_convention {convention}, or leave "
            "the option out."
        )
    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    binary = ensure_venv(Path(venv))

    app = work / "app"
    shutil.copytree(_sample_app(Path(venv)), app, ignore=shutil.ignore_patterns("__pycache__"))
    bundle_root, metadata = _copy_bundle(app, ckpt, members)
    ids = _studies(work / "studies", num_cases, convention)
    _say(f"app {app}, bundle {bundle_root}, label_convention {convention}, studies {ids}")
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    _say(f"packaged metadata's outputs.pred.channel_def: {json.dumps(channel_def)}")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    env = {**os.environ, "PATH": f"{binary}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["PYTHONUNBUFFERED"] = "1"  # its log is read while it runs (a failed /train's error)
    env.pop("PYTHONPATH", None)
    command = [
        str(binary / "monailabel"),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(work / "studies"),
        "--conf",
        "models",
        NAME,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    _say("starting: " + " ".join(command))
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
    failures = []

    def check(name: str, ok: bool, detail: str) -> None:
        _say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    try:
        started = time.time()
        info = _wait_for_server(base, server, log, start_timeout)
        _say(f"server pid {server.pid} answered /info/ after {time.time() - started:.0f} s")
        labels = info["models"][NAME]["labels"]
        # MONAI Label 0.8.5 lists outputs.pred.channel_def, lower-cased, without background
        expected = {name.lower(): int(value) for value, name in channel_def.items() if name.lower() != "background"}
        check("/info labels are the packaged metadata's", labels == expected, json.dumps(labels))
        allowed = {0, *expected.values()}

        def served_and_own(image_id: str) -> tuple:
            """The map ``/infer`` returns for ``image_id`` and the bundle's own (``monai.bundle run``), as images."""
            started = time.time()
            served_file = _infer(base, image_id, work / f"{image_id}_served.nii.gz")
            _say(f"/infer/{NAME}?image={image_id} answered in {time.time() - started:.1f} s")
            own_dir = work / f"own_{image_id}"
            _own_inference(bundle_root, work / "studies" / f"{image_id}.nii.gz", own_dir, work)
            written = sorted(own_dir.glob("*.nii.gz"))
            if len(written) != 1:
                raise RuntimeError(f"the bundle's own inference wrote {written} in {own_dir}, not one label map")
            return nib.load(str(served_file)), nib.load(str(written[0]))

        def compare(name: str, served, own) -> None:
            a, b = np.asarray(served.dataobj), np.asarray(own.dataobj)
            values = sorted(int(v) for v in np.unique(a))
            check(
                name,
                a.shape == b.shape and np.array_equal(a, b) and set(values) <= allowed,
                f"shape {a.shape} vs {b.shape}, values {values} (allowed {sorted(allowed)}), "
                f"{int((a == b).sum()) if a.shape == b.shape else 0} of {b.size} voxels equal",
            )

        case = ids[0]
        served, own = served_and_own(case)
        compare("/infer equals the bundle's own inference", served, own)

        study = nib.load(str(work / "studies" / f"{REORIENTED}.nii.gz"))
        served_r, own_r = served_and_own(REORIENTED)
        compare(f"/infer equals the bundle's own inference, {REORIENTED}", served_r, own_r)
        codes = "".join(nib.aff2axcodes(study.affine))
        check(
            f"/infer on {REORIENTED} (stored {codes}) is on its own grid",
            served_r.shape == study.shape[:3] and np.allclose(served_r.affine, study.affine, atol=1e-4),
            f"shape {served_r.shape} vs study {study.shape[:3]}, axis codes {''.join(nib.aff2axcodes(served_r.affine))}, "
            f"largest affine difference {np.abs(served_r.affine - study.affine).max():.2g}",
        )
        back, first = _restore(np.asarray(served_r.dataobj)), np.asarray(served.dataobj)
        check(
            f"/infer on {REORIENTED}, carried back, equals /infer on {case}",
            back.shape == first.shape and np.array_equal(back, first),
            f"{int((back == first).sum()) if back.shape == first.shape else 0} of {first.size} voxels equal",
        )

        if members:
            _say(f"/train not tried: a bundle serving an ensemble of {len(members)} models does not train")
        else:
            model = bundle_root / "models" / "model.pt"
            before = torch.load(model, weights_only=True)
            started = time.time()
            try:
                answer = _request(
                    f"{base}/train/{NAME}?run_sync=true",
                    json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False}).encode(),
                    {"Content-Type": "application/json"},
                ).decode(errors="replace")
            except urllib.error.HTTPError as error:  # the server stays up: record the failure and go on
                for _ in range(20):  # the server logs the traceback after it has answered
                    time.sleep(0.5)
                    lines = log.read_text(errors="replace").splitlines()
                    since = max((i for i, line in enumerate(lines) if "Train request" in line), default=0)
                    errors = [line for line in lines[since:] if "Error: " in line]  # the first is the cause
                    if errors:
                        break
                answer = f"HTTP {error.code}; the server log's first error since: {errors[0] if errors else '(none)'}"
            after = torch.load(model, weights_only=True)
            changed = any(not torch.equal(after[k], before[k]) for k in before)
            check(
                "/train 1 epoch rewrote models/model.pt",
                changed and after.keys() == before.keys(),
                f"{time.time() - started:.0f} s, answer {answer[:400]}",
            )
            _infer(base, REORIENTED, work / f"{REORIENTED}_after_train.nii.gz")
            check("/infer after /train", True, "answers with the model.pt the training left")
    finally:
        _say(f"stopping the server (pid {server.pid})")
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    _say(f"server log: {log}")
    if failures:
        _say(f"{len(failures)} check(s) failed: {failures}")
        raise SystemExit(1)
    _say("all checks passed")


if __name__ == "__main__":
    fire.Fire(main)
