"""The downloadable bundle: packaged, served over HTTP, downloaded with MONAI's own CLI, run and loaded elsewhere.

``scripts/package_bundle.py`` writes ``segan_v<version>.zip`` (one top-level folder); another team fetches it
with ``python -m monai.bundle download --url``, runs inference from the unpacked copy in a different working
folder, and gets the trained segmentor from ``monai.bundle.load`` — all with nothing pip-installed. The configs
read the segmentor's widths from ``models/model.pt``, so none of this needs a ``--features`` override.
"""

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_script

from bundle import __version__
from bundle.checkpoints import write_recipe
from bundle.demo import make_demo_dataset
from bundle.networks import SegANSegmentor

package_bundle = load_script("package_bundle")

# this project's editable install hidden and the working folder off sys.path, as for a team that only downloaded it
UNINSTALLED = """
import runpy, sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f) + getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", ".")]
"""
RUN_MONAI_BUNDLE = UNINSTALLED + """
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""
LOAD = UNINSTALLED + """
import torch, monai.bundle
bundle_dir, name, expected = sys.argv[1:]
net = monai.bundle.load(name=name, bundle_dir=bundle_dir, workflow_type="inference", device="cpu")
saved = torch.load(expected, map_location="cpu", weights_only=True)
state = net.state_dict()
assert type(net).__name__ == "SegANSegmentor", type(net)
assert set(state) == set(saved), sorted(set(state) ^ set(saved))
assert all(torch.equal(state[k], saved[k]) for k in saved), [k for k in saved if not torch.equal(state[k], saved[k])]
print("loaded", len(saved), "of", len(state), "tensors")
"""
FEATURES = (4, 8, 16, 32)


def _python(code, *args, cwd):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=400
    )


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory):
    """A bundle folder as a training run leaves it: code, configs, docs, and non-paper widths in models/model.pt."""
    root = tmp_path_factory.mktemp("source") / "segan"
    for part in ("bundle", "configs", "docs"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "LICENSE", root)
    (root / "models").mkdir()
    shutil.copy(ROOT / "models" / "README.md", root / "models")
    for leftover in ("tests", "scripts", "eval", "checkpoints", "data/demo"):  # what a run leaves: never shipped
        (root / leftover).mkdir(parents=True)
        (root / leftover / "x.txt").write_text("not for the zip")
    (root / "configs" / "datalist_mine.json").write_text("{}")
    torch.manual_seed(0)
    torch.save(SegANSegmentor(features=FEATURES, skip="cat").state_dict(), root / "models" / "model.pt")
    write_recipe(str(root / "models" / "model.pt"), {"features": list(FEATURES), "skip": "cat"})
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A static file server on 127.0.0.1 (a random free port) over a folder the test fills."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def packaged(source_bundle, server, tmp_path_factory):
    folder, url = server
    zip_path = Path(
        package_bundle.main(output_dir=str(folder), bundle_root=str(source_bundle), base_url=f"{url}/weights")
    )
    (folder / "weights").mkdir()
    shutil.copy(source_bundle / "models" / "model.pt", folder / "weights" / "model.pt")
    return zip_path


def test_zip_holds_one_folder_with_configs_models_docs_code_and_license_only(packaged, source_bundle):
    assert packaged.name == f"segan_v{__version__}.zip"
    names = zipfile.ZipFile(packaged).namelist()
    assert {n.split("/")[0] for n in names} == {"segan"}
    assert {n.split("/")[1] for n in names} == {"configs", "models", "docs", "bundle", "LICENSE", "large_files.yml"}
    for needed in (
        "configs/inference.json",
        "configs/metadata.json",
        "bundle/networks.py",
        "models/model.pt",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert f"segan/{needed}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "datalist_" in n]


def test_zip_is_reproducible_and_its_sha256_is_printed(packaged, source_bundle, tmp_path, capsys):
    again = Path(
        package_bundle.main(output_dir=str(tmp_path), bundle_root=str(source_bundle), base_url="http://x/weights")
    )
    digest = hashlib.sha256(again.read_bytes()).hexdigest()
    assert f"sha256 {digest}  {again.name}" in capsys.readouterr().out
    rebuilt = Path(
        package_bundle.main(output_dir=str(tmp_path / "b"), bundle_root=str(source_bundle), base_url="http://x/weights")
    )
    assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == digest


def test_the_zip_ships_the_recipe_and_metadata_describing_its_weights(packaged, source_bundle, tmp_path):
    archive = zipfile.ZipFile(packaged)
    recipe = json.loads(archive.read("segan/models/model_recipe.json"))
    assert recipe["features"] == list(FEATURES)
    formats = json.loads(archive.read("segan/configs/metadata.json"))["network_data_format"]
    assert formats["inputs"]["image"]["channel_def"] == {"0": "T1c", "1": "T2", "2": "FLAIR"}
    assert formats["post_processed_outputs"]["pred"]["channel_def"]["4"] == "enhancing tumor"

    custom = tmp_path / "segan"
    shutil.copytree(source_bundle, custom)
    model = custom / "models" / "model.pt"
    torch.save(SegANSegmentor(in_channels=1, out_channels=2, features=FEATURES).state_dict(), model)
    write_recipe(
        str(model),
        {
            "features": list(FEATURES),
            "skip": "cat",
            "modalities": ["mri"],
            "regions": {"gm": [1], "wm": [2]},
            "region_labels": [1, 2],
        },
    )
    formats = json.loads(
        zipfile.ZipFile(package_bundle.main(output_dir=str(tmp_path / "dist"), bundle_root=str(custom))).read(
            "segan/configs/metadata.json"
        )
    )["network_data_format"]
    assert formats["inputs"]["image"]["channel_def"] == {"0": "mri"}
    assert formats["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "gm", "2": "wm"}


def test_packaging_weights_without_their_recipe_says_what_to_do(source_bundle, tmp_path):
    bare = tmp_path / "segan"
    shutil.copytree(source_bundle, bare)
    os.remove(bare / "models" / "model_recipe.json")
    with pytest.raises(FileNotFoundError, match="no recipe beside"):
        package_bundle.main(output_dir=str(tmp_path / "dist"), bundle_root=str(bare))


def test_packaging_without_trained_weights_says_what_to_do(source_bundle, tmp_path):
    empty = tmp_path / "segan"
    shutil.copytree(source_bundle, empty)
    os.remove(empty / "models" / "model.pt")
    with pytest.raises(FileNotFoundError, match="Train first"):
        package_bundle.main(output_dir=str(tmp_path / "dist"), bundle_root=str(empty))
    assert not (tmp_path / "dist" / f"segan_v{__version__}.zip").exists()


@pytest.mark.slow
def test_downloaded_zip_runs_inference_from_another_folder(packaged, server, tmp_path):
    _, url = server
    bundles, elsewhere, data, out = (tmp_path / d for d in ("bundles", "elsewhere", "data", "predictions"))
    elsewhere.mkdir()
    got = _python(
        RUN_MONAI_BUNDLE,
        "download",
        "--name",
        "segan",
        "--url",
        f"{url}/{packaged.name}",
        "--bundle_dir",
        bundles,
        cwd=elsewhere,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    assert (bundles / "segan" / "models" / "model.pt").read_bytes() == (
        packaged.parent / "weights" / "model.pt"
    ).read_bytes()

    make_demo_dataset(str(data), num_cases=2, shape=(40, 40, 24), seed=2)
    # no --bundle_root, no --features: the config finds its bundle and the widths of the weights it ships
    got = _python(
        RUN_MONAI_BUNDLE,
        "run",
        "--config_file",
        bundles / "segan" / "configs" / "inference.json",
        "--dataset_dir",
        data,
        "--output_dir",
        out,
        "--num_workers",
        "0",
        "--progress",
        "false",
        cwd=elsewhere,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["Demo_000_seg.nii.gz", "Demo_001_seg.nii.gz"]


@pytest.mark.slow
def test_large_files_yml_fetches_and_checks_the_weights(packaged, tmp_path):
    with zipfile.ZipFile(packaged) as archive:
        archive.extractall(tmp_path)
    bundle = tmp_path / "segan"
    weights = (bundle / "models" / "model.pt").read_bytes()
    listing = (bundle / "large_files.yml").read_text()
    assert f'hash_val: "{hashlib.sha256(weights).hexdigest()}"' in listing and 'hash_type: "sha256"' in listing
    os.remove(bundle / "models" / "model.pt")
    got = _python(RUN_MONAI_BUNDLE, "download_large_files", "--bundle_path", bundle, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    assert (bundle / "models" / "model.pt").read_bytes() == weights


@pytest.mark.slow
def test_monai_bundle_load_returns_the_trained_segmentor_with_every_tensor(packaged, tmp_path):
    with zipfile.ZipFile(packaged) as archive:
        archive.extractall(tmp_path / "bundles")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _python(
        LOAD, tmp_path / "bundles", "segan", tmp_path / "bundles" / "segan" / "models" / "model.pt", cwd=elsewhere
    )
    assert got.returncode == 0, got.stderr[-3000:]
    assert "loaded 40 of 40 tensors" in got.stdout


@pytest.mark.slow
def test_monai_bundle_load_refuses_weights_it_could_only_load_in_part(packaged, tmp_path):
    with zipfile.ZipFile(packaged) as archive:
        archive.extractall(tmp_path / "bundles")
    model = tmp_path / "bundles" / "segan" / "models" / "model.pt"
    torch.save(SegANSegmentor(in_channels=4, features=FEATURES).state_dict(), model)  # all four modalities
    got = _python(LOAD, tmp_path / "bundles", "segan", model, cwd=tmp_path)
    assert got.returncode != 0
    assert "has 4 in channels but the config gives 3 (from `modalities` and `context_slices`)" in got.stderr
