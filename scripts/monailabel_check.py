"""Serve and train the bundle with a real MONAI Label 0.8.5 server, offline, on 127.0.0.1, and check the contract.

    python scripts/monailabel_check.py --workdir /tmp/monailabel_check

1. Creates MONAI Label's own virtualenv if it is missing (``--venv``; it pulls its own packages, pinned as in
   README.md: ``monailabel==0.8.5 "pydicom<3" "dicomweb-client==0.59.1" "pynetdicom<3"``, with torch constrained to
   the version of this interpreter so no CUDA build is downloaded; then ``torchvision==0.16.2`` without
   dependencies, since PyPI's CUDA torchvision does not import beside a CPU torch).
2. Copies the ``monaibundle`` sample app and puts this bundle (configs, code, ``models/model.pt``) in
   ``<app>/model/segan``; writes demo studies as MONAI Label's datastore wants them: one 4D NIfTI per case in
   ``image_modalities_4d`` order, labels in ``labels/final``.
3. Starts ``monailabel start_server`` on 127.0.0.1, checks that ``/info/`` lists the bundle's label values, that
   ``/infer/segan`` returns the same label map, voxel for voxel, as the bundle's own inference, runs a 1-epoch
   ``/train/segan`` and checks that it rewrote ``models/model.pt`` (and that ``/infer`` still works), then stops
   the server by its process id. Prints each check; exits non-zero if one fails.

Needs trained weights (``--ckpt_path``, default ``models/model.pt``: run the demo training first).
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

from bundle.constants import MSD_MODALITIES, label_channel_def  # noqa: E402
from bundle.demo import make_demo_dataset  # noqa: E402

MONAILABEL = ["monailabel==0.8.5", "pydicom<3", "dicomweb-client==0.59.1", "pynetdicom<3"]
TORCHVISION_FALLBACK = "torchvision==0.16.2"
DEMO_SUFFIX = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
NAME = "segan"


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


def _copy_bundle(app: Path, ckpt_path: Path) -> Path:
    target = app / "model" / NAME
    for part in ("configs", "bundle", "docs"):
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__", "datalist*"))
    shutil.copy(ROOT / "LICENSE", target)
    (target / "models").mkdir()
    shutil.copy(ckpt_path, target / "models" / "model.pt")
    return target


def _studies(folder: Path, num_cases: int) -> list[str]:
    import nibabel as nib
    import numpy as np
    from monai.data import NibabelWriter  # noqa: F401  (MONAI is this interpreter's)

    demo = folder.parent / "demo"
    make_demo_dataset(str(demo), num_cases=num_cases, shape=(96, 96, 64), seed=7)
    (folder / "labels" / "final").mkdir(parents=True)
    ids = []
    for case in sorted(p.name for p in demo.iterdir() if p.is_dir()):
        images = [nib.load(str(demo / case / f"{case}_{DEMO_SUFFIX[m]}.nii.gz")) for m in MSD_MODALITIES]
        stacked = np.stack([np.asarray(i.get_fdata(dtype=np.float32)) for i in images], axis=-1)
        nib.save(nib.Nifti1Image(stacked, images[0].affine), str(folder / f"{case}.nii.gz"))
        shutil.copy(demo / case / f"{case}_seg.nii.gz", folder / "labels" / "final" / f"{case}.nii.gz")
        ids.append(case)
    return ids


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


#: where the MONAI Label server's virtual environment is kept, and the weights it serves, unless given
DEFAULT_VENV = str(Path.home() / ".cache" / "segan_monailabel" / "venv")
DEFAULT_CKPT = str(ROOT / "models" / "model.pt")


def main(
    workdir: str = "/tmp/segan_monailabel_check",
    venv: str = DEFAULT_VENV,
    ckpt_path: str = DEFAULT_CKPT,
    num_cases: int = 3,
    start_timeout: float = 900,
) -> None:
    """Run every check; raise ``SystemExit(1)`` if one fails."""
    import nibabel as nib
    import numpy as np
    import torch

    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"no trained weights at {ckpt}: train first (python -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/demo.json']\"), or pass --ckpt_path."
        )
    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    binary = ensure_venv(Path(venv))

    app = work / "app"
    shutil.copytree(_sample_app(Path(venv)), app, ignore=shutil.ignore_patterns("__pycache__"))
    bundle_root = _copy_bundle(app, ckpt)
    ids = _studies(work / "studies", num_cases)
    _say(f"app {app}, bundle {bundle_root}, studies {ids}")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    env = {**os.environ, "PATH": f"{binary}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
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
        expected = {name: int(value) for value, name in label_channel_def("brats").items() if name != "background"}
        check("/info labels", labels == expected, json.dumps(labels))

        case = ids[0]
        started = time.time()
        served_file = _infer(base, case, work / f"{case}_served.nii.gz")
        _say(f"/infer/{NAME}?image={case} answered in {time.time() - started:.1f} s")
        own_dir = work / "own"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                str(bundle_root / "configs" / "inference.json"),
                "--bundle_root",
                str(bundle_root),
                "--dataset_dir",
                str(work / "studies" / f"{case}.nii.gz"),
                "--output_dir",
                str(own_dir),
                "--progress",
                "false",
            ],
            check=True,
            cwd=work,
            capture_output=True,
        )
        served = np.asarray(nib.load(str(served_file)).dataobj)
        own = np.asarray(nib.load(str(own_dir / f"{case}_seg.nii.gz")).dataobj)
        same = served.shape == own.shape and np.array_equal(served, own)
        values = sorted(int(v) for v in np.unique(served))
        check(
            "/infer equals the bundle's own inference",
            same,
            f"shape {served.shape} vs {own.shape}, values {values}, "
            f"{int((served == own).sum()) if served.shape == own.shape else 0} of {own.size} voxels equal",
        )

        model = bundle_root / "models" / "model.pt"
        before = torch.load(model, weights_only=True)
        started = time.time()
        answer = _request(
            f"{base}/train/{NAME}?run_sync=true",
            json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False}).encode(),
            {"Content-Type": "application/json"},
        )
        after = torch.load(model, weights_only=True)
        changed = any(not torch.equal(after[k], before[k]) for k in before)
        check(
            "/train 1 epoch rewrote models/model.pt",
            changed and after.keys() == before.keys(),
            f"{time.time() - started:.0f} s, answer {answer[:200].decode(errors='replace')}",
        )
        _infer(base, case, work / f"{case}_after_train.nii.gz")
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
