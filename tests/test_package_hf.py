"""The Hugging Face Hub layout: ``scripts/package_bundle.py --layout huggingface`` writes the folder a Hub model
repository holds, which ``python -m monai.bundle download --source huggingface_hub`` copies into
``<bundle_dir>/<name>/`` as it is.

Checked offline: the files and their layout, the model card's YAML front matter, ``large_files.yml`` (its hashes
are those of the weights), what the model zoo's ``ci/verify_hf_model.py`` checks of a folder (``README.md``,
``LICENSE`` and ``metadata.json`` at the top, the version in the changelog, the metadata against the schema when
a copy of it is at hand), and that MONAI alone, from another working folder, builds ``network_def`` from the
folder's ``configs/inference.json`` and loads its weights with ``monai.bundle.load``. Nothing is uploaded or
downloaded.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, load_script

from bundle import __version__
from bundle.checkpoints import write_recipe
from bundle.networks import SegANSegmentor

package_bundle = load_script("package_bundle")

FEATURES = [4, 8, 16, 32]
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TOP_LEVEL = {"README.md", "LICENSE", "metadata.json", "configs", "models", "docs", "bundle"}

# MONAI alone: this project's editable install hidden, the working folder off sys.path. For each folder given,
# network_def from configs/inference.json with bundle_root there, then monai.bundle.load of its weights.
LOAD_FOLDERS = """
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in repr(f) + getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", ".")]
import os, torch, monai.bundle
from monai.bundle import ConfigParser
for folder in sys.argv[1:]:
    for module in [m for m in sys.modules if m == "bundle" or m.startswith("bundle.")]:
        del sys.modules[module]  # each folder's own custom code
    parser = ConfigParser()
    parser.read_config(os.path.join(folder, "configs", "inference.json"))
    parser["bundle_root"] = folder
    net = parser.get_parsed_content("network_def")
    code = sys.modules["bundle"].__file__
    assert code.startswith(os.path.join(folder, "bundle")), code
    print(folder, "network_def", type(net).__name__, parser.get_parsed_content("features"))
    loaded = monai.bundle.load(name=os.path.basename(folder), bundle_dir=os.path.dirname(folder),
                               workflow_type="inference", device="cpu")
    saved = torch.load(os.path.join(folder, "models", "model.pt"), map_location="cpu", weights_only=True)
    state = loaded.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    print(folder, "loaded", len(saved), "tensors")
"""


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory):
    """A bundle folder after training: code, configs, docs, small random weights and their recipe, and
    leftovers that never ship."""
    root = tmp_path_factory.mktemp("source") / "segan"
    for part in ("bundle", "configs", "docs"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "LICENSE", root)
    (root / "models").mkdir()
    shutil.copy(ROOT / "models" / "README.md", root / "models")
    (root / "configs" / "datalist_mine.json").write_text("{}")
    (root / "eval").mkdir()
    (root / "eval" / "x.txt").write_text("not shipped")
    torch.manual_seed(0)
    torch.save(SegANSegmentor(features=FEATURES, skip="cat").state_dict(), root / "models" / "model.pt")
    write_recipe(str(root / "models" / "model.pt"), {"features": FEATURES, "skip": "cat"})
    return root


@pytest.fixture(scope="module")
def with_weights(source_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_with")
    return Path(package_bundle.main(output_dir=str(out), bundle_root=str(source_bundle), layout="huggingface"))


@pytest.fixture(scope="module")
def without_weights(source_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_without")
    return Path(
        package_bundle.main(
            output_dir=str(out), bundle_root=str(source_bundle), layout="huggingface", include_weights="false"
        )
    )  # as fire passes `--include_weights false`


def _front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n"), text[:80]
    block, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(block), body


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_folder_holds_the_bundle_files_the_model_card_and_the_zoo_metadata(with_weights, source_bundle, tmp_path):
    assert with_weights.name == "segan"
    assert {p.name for p in with_weights.iterdir()} == TOP_LEVEL
    files = _files(with_weights)
    for needed in (
        "configs/inference.json",
        "configs/metadata.json",
        "bundle/networks.py",
        "models/model.pt",
        "models/model_recipe.json",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert needed in files
    assert not [
        f for f in files if "__pycache__" in f or f.endswith(".pyc") or "datalist_" in f or f.startswith("eval")
    ]
    assert (with_weights / "models" / "model.pt").read_bytes() == (source_bundle / "models" / "model.pt").read_bytes()

    # the same files as the zip, with the card and the top-level metadata added
    zip_path = package_bundle.main(output_dir=str(tmp_path), bundle_root=str(source_bundle))
    with zipfile.ZipFile(zip_path) as archive:
        zipped = {n.split("/", 1)[1]: archive.read(n) for n in archive.namelist()}
    assert files == set(zipped) | {"README.md", "metadata.json"}
    assert all((with_weights / f).read_bytes() == content for f, content in zipped.items())


def test_the_model_card_has_the_hub_front_matter_and_links_into_docs(with_weights, source_bundle):
    meta, body = _front_matter(with_weights / "README.md")
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "monai"
    assert meta["pipeline_tag"] == "image-segmentation"
    assert {"monai", "medical", "segmentation", "mri"} <= set(meta["tags"])
    assert body.lstrip().startswith("# SegAN brain tumour segmentation")
    assert "](docs/training.md)" in body and "](training.md)" not in body
    card = (source_bundle / "docs" / "README.md").read_text()
    assert body.lstrip("\n").replace("](docs/", "](") == card


def test_what_the_zoo_checks_of_a_hugging_face_model_folder(with_weights, tmp_path):
    # ci/verify_hf_model.py: README.md, LICENSE, metadata.json at the top; version and changelog
    for needed in ("README.md", "LICENSE", "metadata.json"):
        assert (with_weights / needed).is_file()
    metadata = json.loads((with_weights / "metadata.json").read_text())
    assert (with_weights / "metadata.json").read_bytes() == (with_weights / "configs" / "metadata.json").read_bytes()
    assert metadata["version"] == __version__ and metadata["version"] in metadata["changelog"]
    # the metadata against the schema its "schema" names (the zoo downloads it; a local copy here, if any)
    if not SCHEMA.is_file() or Path(metadata["schema"]).name != SCHEMA.name:
        pytest.skip(f"no copy of {Path(metadata['schema']).name} beside this checkout: schema not checked offline")
    from monai.bundle import verify_metadata

    shutil.copy(SCHEMA, tmp_path / SCHEMA.name)  # verify_metadata downloads to filepath unless the file is there
    verify_metadata(meta_file=str(with_weights / "metadata.json"), filepath=str(tmp_path / SCHEMA.name))


def test_without_weights_large_files_yml_lists_each_with_its_sha256(without_weights, source_bundle):
    assert {p.name for p in without_weights.iterdir()} == TOP_LEVEL | {"large_files.yml"}
    assert not (without_weights / "models" / "model.pt").exists()
    assert (without_weights / "models" / "model_recipe.json").is_file()  # the configs read it
    listing = yaml.safe_load((without_weights / "large_files.yml").read_text())["large_files"]
    assert [entry["path"] for entry in listing] == ["models/model.pt"]
    for entry in listing:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}  # monai's download_url takes these
        assert entry["url"].startswith("FILL IN") and entry["hash_type"] == "sha256"
        weights = (source_bundle / entry["path"]).read_bytes()
        assert entry["hash_val"] == hashlib.sha256(weights).hexdigest()


def test_a_base_url_fills_in_the_urls(source_bundle, tmp_path):
    folder = Path(
        package_bundle.main(
            output_dir=str(tmp_path),
            bundle_root=str(source_bundle),
            layout="huggingface",
            include_weights=False,
            base_url="https://example.org/segan/",
        )
    )
    listing = yaml.safe_load((folder / "large_files.yml").read_text())["large_files"]
    assert listing[0]["url"] == "https://example.org/segan/model.pt"


def test_an_existing_folder_is_refused_and_a_version_without_changelog_too(with_weights, source_bundle, tmp_path):
    before = _files(with_weights)
    with pytest.raises(FileExistsError, match="not empty"):
        package_bundle.main(output_dir=str(with_weights.parent), bundle_root=str(source_bundle), layout="huggingface")
    assert _files(with_weights) == before
    with pytest.raises(ValueError, match="--layout"):
        package_bundle.main(output_dir=str(tmp_path), bundle_root=str(source_bundle), layout="hf")

    bare = tmp_path / "segan"
    shutil.copytree(source_bundle, bare)
    metadata = json.loads((bare / "configs" / "metadata.json").read_text())
    metadata["changelog"] = {"0.0.1": "older"}
    (bare / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="changelog has no entry"):
        package_bundle.main(output_dir=str(tmp_path / "dist"), bundle_root=str(bare), layout="huggingface")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


@pytest.mark.slow
def test_monai_alone_builds_and_loads_the_downloaded_folders(with_weights, without_weights, source_bundle, tmp_path):
    # the weights-free folder after download_large_files: each file fetched to its path, its hash as listed
    from monai.apps.utils import check_hash

    fetched = tmp_path / "bundles" / "segan"
    shutil.copytree(without_weights, fetched)
    for entry in yaml.safe_load((fetched / "large_files.yml").read_text())["large_files"]:
        shutil.copy(source_bundle / entry["path"], fetched / entry["path"])
        assert check_hash(str(fetched / entry["path"]), entry["hash_val"], entry["hash_type"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = subprocess.run(
        [sys.executable, "-c", LOAD_FOLDERS, str(with_weights), str(fetched)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    for folder in (with_weights, fetched):
        assert f"{folder} network_def SegANSegmentor {FEATURES}" in got.stdout
        assert f"{folder} loaded 40 tensors" in got.stdout
