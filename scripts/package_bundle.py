"""Write the downloadable bundle: ``<name>_v<version>.zip`` with one top-level folder ``<name>/``.

    python scripts/package_bundle.py --output_dir dist
    python scripts/package_bundle.py --output_dir dist --base_url https://example.org/segan/v0.3.1

The zip holds what the bundle needs to run where it is unpacked, and nothing else: ``configs/`` (without
``datalist*`` files, which name local data), ``models/`` (``model.pt``, ``model.ts`` if exported, its README),
``docs/``, the custom code ``bundle/`` and ``LICENSE``; ``models/model_recipe.json``, the settings the weights
were trained for (which inference, evaluation and MONAI Label read), is required and always shipped, and the
zip's ``configs/metadata.json`` describes those weights (input channels, output regions and label values); no
tests, scripts, data, ``eval/``, ``checkpoints/`` or caches. The version is ``configs/metadata.json``'s. It
prints the zip's sha256 (the zip is byte-for-byte reproducible: fixed order and timestamps), for the download
page and ``monai.bundle download``'s users.

With ``--base_url`` it also writes ``large_files.yml`` into the bundle (url, sha256 ``hash_val`` and
``hash_type`` of each weight file, as model-zoo bundles have), so ``python -m monai.bundle
download_large_files --bundle_path <bundle>`` fetches and checks the weights once they are uploaded to
``<base_url>/<file name>``; ``--include_weights false`` then leaves them out of the zip.

``--layout huggingface`` writes, instead of the zip, the folder a Hugging Face Hub model repository holds
(``<output_dir>/<name>/``, for ``hf upload`` / ``huggingface-cli upload``; ``python -m monai.bundle download --source
huggingface_hub`` puts the repository's files in ``<bundle_dir>/<name>/``, which is then this folder):

    python scripts/package_bundle.py --layout huggingface --output_dir dist/hf

It holds the zip's files, unpacked (``configs/``, ``models/``, ``docs/``, ``bundle/``, ``LICENSE``), plus

* ``README.md``, the Hub's model card: ``docs/README.md`` under a YAML front matter block (``license``,
  ``library_name: monai``, ``pipeline_tag: image-segmentation``, ``tags``), its relative links pointing into
  ``docs/``;
* ``metadata.json``, a copy of ``configs/metadata.json``: with ``README.md`` and ``LICENSE`` it is what the
  model zoo's ``hf_models/<name>/`` entry holds and its ``ci/verify_hf_model.py`` checks;
* with ``--include_weights false``, ``large_files.yml``: each weight file's path, its url (``<base_url>/<file
  name>``, or a placeholder to fill in when there is no ``--base_url``) and sha256. ``models/model_recipe.json``
  ships either way: the configs read it, and it describes the weights fetched later.

The version must be in the metadata's changelog (the zoo's check). An existing non-empty folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from bundle import __version__  # noqa: E402
from bundle.checkpoints import read_recipe, recipe_path, segmentor_settings  # noqa: E402
from bundle.constants import LABEL_NAMES, REGION_LABEL_PRESETS, REGION_PRESETS  # noqa: E402
from bundle.ensemble import pack, packed_network_def  # noqa: E402
from bundle.files import atomic_path  # noqa: E402

WEIGHT_FILES = ("model.pt", "model.ts")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same bundle always gives the same sha256


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _code_and_configs(root: Path) -> list[Path]:
    """The files of ``configs/``, ``docs/`` and ``bundle/`` that belong in the bundle, plus ``LICENSE``."""
    files = [p for p in (root / "configs").rglob("*") if p.is_file() and not p.name.startswith("datalist")]
    files += [p for p in (root / "docs").rglob("*") if p.is_file()]
    files += [p for p in (root / "bundle").rglob("*.py") if "__pycache__" not in p.parts]
    files.append(root / "LICENSE")
    return files


def _check_weights(model: Path) -> dict:
    """The recipe of ``model``, checked against the weights' own shapes; an error saying what to do otherwise."""
    import torch

    if not model.is_file():
        raise FileNotFoundError(
            f"no trained weights at '{model}': the bundle ships its segmentor. Train first (e.g. the demo: python -m "
            "monai.bundle run training --config_file \"['configs/train.json','configs/demo.json']\"), or point "
            "--bundle_root at a bundle that has models/model.pt."
        )
    recipe = read_recipe(str(model))
    if not recipe:
        raise FileNotFoundError(
            f"no recipe beside '{model}' ({recipe_path(str(model))}): the bundle ships the settings its weights were "
            "trained for. Training writes it with model.pt; for weights trained before, write it with "
            "bundle.checkpoints.write_recipe(path, {'features': ..., 'skip': ..., 'modalities': ..., ...})."
        )
    try:
        settings = segmentor_settings(torch.load(model, map_location="cpu", weights_only=True))
    except ValueError:  # another network_def (an overlay's): its shapes are checked when it loads
        return recipe
    in_channels = len(recipe.get("modalities", ())) * (2 * int(recipe.get("context_slices", 0)) + 1)
    for name, saved, recorded in (
        ("features", settings["features"], recipe.get("features")),
        ("skip", settings["skip"], recipe.get("skip")),
        ("input channels", settings["in_channels"], in_channels or None),
        ("regions", settings["out_channels"], len(recipe["regions"]) if "regions" in recipe else None),
    ):
        if recorded is not None and saved != recorded:
            raise ValueError(f"'{model}' holds a segmentor with {name} {saved}, but its recipe says {recorded}.")
    print(
        f"models/model.pt: features {settings['features']}, skip '{settings['skip']}', "
        f"{settings['in_channels']} input channels, {settings['out_channels']} regions"
    )
    return recipe


_MODALITY_NAMES = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}


def _metadata(metadata: dict, recipe: dict) -> dict:
    """``metadata`` with ``network_data_format`` describing the weights of ``recipe``: input channels (each
    modality at each context slice), output maps, and the label values the inference writes (MONAI Label
    lists these as the model's labels)."""
    metadata = json.loads(json.dumps(metadata))
    formats = metadata["network_data_format"]
    modalities = [_MODALITY_NAMES.get(m, m) for m in recipe.get("modalities", ["t1c", "t2", "flair"])]
    k = int(recipe.get("context_slices", 0))
    inputs = [m if not k else f"{m} z{offset:+d}" for offset in range(-k, k + 1) for m in modalities]
    formats["inputs"]["image"]["num_channels"] = len(inputs)
    formats["inputs"]["image"]["channel_def"] = {str(i): name for i, name in enumerate(inputs)}
    convention = recipe.get("label_convention", "brats")
    regions = recipe.get("regions", REGION_PRESETS[convention])
    values = recipe.get("region_labels", REGION_LABEL_PRESETS[convention])
    if regions == REGION_PRESETS.get(convention) and list(values) == REGION_LABEL_PRESETS[convention]:
        names = dict(LABEL_NAMES[convention])
    else:
        names = {int(v): name for name, v in zip(regions, values)}
    labels = {"0": "background", **{str(v): names[v] for v in sorted(names) if v != 0}}
    multiclass = bool(recipe.get("multiclass", False))
    if multiclass or regions != REGION_PRESETS["brats"]:  # the texts of configs/metadata.json describe that one
        metadata.update(_class_texts(convention, regions, multiclass))
    formats["outputs"]["pred"]["num_channels"] = len(regions)
    formats["outputs"]["pred"]["channel_def"] = labels
    formats["post_processed_outputs"]["pred"]["channel_def"] = labels
    formats["post_processed_outputs"]["pred"]["value_range"] = [int(v) for v in labels]
    return metadata


def _class_texts(convention: str, regions: dict, multiclass: bool) -> dict[str, str]:
    """``label_classes`` and ``pred_classes`` describing the output channels of weights trained for ``regions``."""
    channels = ", ".join(
        f"channel {i} {name} ({', '.join(str(v) for v in values)})" for i, (name, values) in enumerate(regions.items())
    )
    kind = "classes (mutually exclusive)" if multiclass else "binary region maps"
    activation = "softmax, then argmax" if multiclass else "sigmoid, then threshold 0.5"
    return {
        "label_classes": f"{len(regions)} {kind} made from the label values (label_convention '{convention}'): {channels}",
        "pred_classes": (
            f"{len(regions)} logits, one per channel of label_classes: {activation} (the raw outputs are logits, not "
            "probabilities). The inference post-processing turns them into one uint8 label map whose values "
            "channel_def names; outputs.pred.channel_def names these label values too, since MONAI Label lists a "
            "bundle's labels from it"
        ),
    }


#: the url ``large_files.yml`` gives a weight file when no ``--base_url`` says where it will be downloadable
URL_PLACEHOLDER = "FILL IN: the download url of models/{file}"


def _large_files_yml(weights: list[Path], base_url: str) -> str:
    lines = (
        []
        if base_url
        else [
            "# Fill in each url (where the file can be downloaded), then:",
            "#   python -m monai.bundle download_large_files --bundle_path <this folder>",
        ]
    )
    lines.append("large_files:")
    for path in weights:
        url = f'{base_url.rstrip("/")}/{path.name}' if base_url else URL_PLACEHOLDER.format(file=path.name)
        lines += [
            f'  - path: "models/{path.name}"',
            f'    url: "{url}"',
            f'    hash_val: "{sha256(path)}"',
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


#: the Hub's tags of the model card; the Hub lists models by them
HF_TAGS = ("monai", "medical", "segmentation", "brain-tumor", "brain-tumour", "mri", "brats", "segan", "gan")


def _hf_license(license_text: str) -> list[str]:
    """The front matter lines naming the license of ``LICENSE`` as the Hub's identifiers do."""
    if "Apache License" in license_text and "Version 2.0" in license_text:
        return ["license: apache-2.0"]
    if "MIT License" in license_text or "Permission is hereby granted, free of charge" in license_text:
        return ["license: mit"]
    return ["license: other", "license_name: see-license", "license_link: LICENSE"]  # the Hub's form for others


# a relative link target in Markdown (``](x)``) or HTML (``src="x"``, ``href="x"``): not a url, anchor or absolute path
_RELATIVE_LINK = re.compile(r'(\]\(|(?:src|href)=")(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)')


def _model_card(card: str, license_text: str) -> str:
    """``docs/README.md`` as the repository's top-level ``README.md``: the Hub's YAML front matter, then the card
    with its relative links (``training.md``, ``images/...``) pointing into ``docs/``, where those files are."""
    front = ["---", *_hf_license(license_text), "library_name: monai", "pipeline_tag: image-segmentation", "tags:"]
    front += [f"- {tag}" for tag in HF_TAGS]
    front.append("---")
    return "\n".join(front) + "\n\n" + _RELATIVE_LINK.sub(lambda m: m.group(1) + "docs/", card)


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """``files`` (relative path -> content) as ``folder``, made beside it and renamed into place: a folder is
    there complete or not at all. An existing non-empty ``folder`` is refused, never overwritten."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"'{folder}' exists and is not empty: remove it or choose another --output_dir.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        for relative in sorted(files):
            path = tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[relative])
            os.chmod(path, 0o644)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the bundle packaged unless another is given: this checkout
DEFAULT_BUNDLE_ROOT = str(ROOT)


LAYOUTS = ("zip", "huggingface")


def _flag(value: bool | str, option: str) -> bool:
    """A yes/no option as given: fire passes ``--include_weights false`` as the text ``'false'`` (truthy)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("false", "no", "0", "off"):
            return False
        if text in ("true", "yes", "1", "on"):
            return True
        raise ValueError(f"--{option} {value!r}: give true or false.")
    return bool(value)


def _bundle_files(
    root: Path, recipe_file: Path, weights: list[Path], metadata: dict, include_weights: bool, base_url: str
) -> dict[str, bytes]:
    """The bundle's files, relative path -> content: what the zip holds under ``<name>/``."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in _code_and_configs(root)}
    files["configs/metadata.json"] = (json.dumps(metadata, indent=4) + "\n").encode()
    files["models/model_recipe.json"] = recipe_file.read_bytes()
    if (root / "models" / "README.md").is_file():
        files["models/README.md"] = (root / "models" / "README.md").read_bytes()
    if include_weights:
        files.update({f"models/{p.name}": p.read_bytes() for p in weights})
    if base_url:
        files["large_files.yml"] = _large_files_yml(weights, base_url).encode()
    return files


def _ensemble_inference(source: Path, recipe: dict) -> bytes:
    """``configs/inference.json`` for a packed ensemble: ``network_def`` builds it, ``view_axes`` are its members'."""
    config = json.loads(source.read_text())
    config["network_def"] = packed_network_def(config["network_def"], recipe)
    config["view_axes"] = [m["slice_axis"] for m in recipe["ensemble"]]
    return (json.dumps(config, indent=4) + "\n").encode()


def _write_zip(out: Path, name: str, files: dict[str, bytes]) -> None:
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "x", zipfile.ZIP_DEFLATED) as archive:
        for relative in sorted(files):
            info = zipfile.ZipInfo(f"{name}/{relative}", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[relative])


def main(
    output_dir: str = "dist",
    bundle_root: str = DEFAULT_BUNDLE_ROOT,
    name: str = "segan",
    base_url: str = "",
    include_weights: bool = True,
    layout: str = "zip",
    ensemble: list[str] | str = "",
) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` from ``bundle_root``, print its sha256, return its path; with
    ``layout="huggingface"``, the Hub repository's folder ``<output_dir>/<name>/`` instead (its path).

    With ``ensemble`` (weight files, as inference's ``--ensemble``) the bundle ships them packed as one
    ``models/model.pt`` (``bundle.ensemble.pack``) and a ``configs/inference.json`` whose ``network_def`` is their
    ensemble, so MONAI Label and ``monai.bundle load`` serve it as one model; ``models/model.pt`` of ``bundle_root``
    is not shipped then."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose one of {list(LAYOUTS)}.")
    include_weights = _flag(include_weights, "include_weights")
    root = Path(bundle_root).resolve()
    source_metadata = json.loads((root / "configs" / "metadata.json").read_text())
    version = source_metadata["version"]
    if version != __version__:
        raise ValueError(
            f"configs/metadata.json says version {version} but bundle/__init__.py says {__version__}: bump both "
            "(and the metadata changelog) together."
        )
    if layout == "huggingface" and version not in source_metadata.get("changelog", {}):
        raise ValueError(
            f"configs/metadata.json's changelog has no entry for its version {version}: add one (the "
            "model zoo's Hugging Face check requires it)."
        )
    packed = Path(tempfile.mkdtemp(prefix="segan_ensemble_")) if ensemble else None
    try:
        return _package(root, source_metadata, output_dir, name, base_url, include_weights, layout, ensemble, packed)
    finally:
        if packed is not None:
            shutil.rmtree(packed, ignore_errors=True)


def _package(root, source_metadata, output_dir, name, base_url, include_weights, layout, ensemble, packed) -> str:
    version = source_metadata["version"]
    models = root / "models"
    if ensemble:
        recipe = pack(ensemble, str(packed / "model.pt"))
        models = packed
        print(
            f"models/model.pt: an ensemble of {len(recipe['ensemble'])} models, slice axes "
            f"{[m['slice_axis'] for m in recipe['ensemble']]}"
        )
    else:
        recipe = _check_weights(models / "model.pt")
    weights = [models / f for f in WEIGHT_FILES if (models / f).is_file()]
    if not include_weights and not base_url and layout == "zip":
        raise ValueError(
            "--include_weights false needs --base_url: without large_files.yml nobody could get the weights."
        )

    metadata = _metadata(source_metadata, recipe)
    files = _bundle_files(
        root, Path(recipe_path(str(models / "model.pt"))), weights, metadata, include_weights, base_url
    )
    if packed is not None:
        files["configs/inference.json"] = _ensemble_inference(root / "configs" / "inference.json", recipe)
    if layout == "huggingface":
        return _huggingface_folder(Path(output_dir) / name, root, files, weights, include_weights, base_url)

    out = Path(output_dir) / f"{name}_v{version}.zip"
    _write_zip(out, name, files)
    print(f"{len(files)} files in {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if base_url:
        for path in weights:
            print(f"upload {path} to {base_url.rstrip('/')}/{path.name} (listed in large_files.yml)")
    print(f"sha256 {sha256(out)}  {out.name}")
    return str(out)


def _huggingface_folder(
    folder: Path, root: Path, files: dict[str, bytes], weights: list[Path], include_weights: bool, base_url: str
) -> str:
    """Write the Hub repository's folder: the bundle's ``files`` plus the model card, the zoo's top-level
    ``metadata.json`` and, for weights kept out, ``large_files.yml``."""
    files = dict(files)
    files["README.md"] = _model_card((root / "docs" / "README.md").read_text(), (root / "LICENSE").read_text()).encode()
    files["metadata.json"] = files["configs/metadata.json"]
    if not include_weights:
        files["large_files.yml"] = _large_files_yml(weights, base_url).encode()
    _write_folder(folder, files)
    size = sum(len(content) for content in files.values())
    print(f"{len(files)} files in {folder}/ ({size / 1e6:.2f} MB), the folder of a Hugging Face Hub model repository")
    if not include_weights:
        for path in weights:
            where = f"{base_url.rstrip('/')}/{path.name}" if base_url else "a url you fill in in large_files.yml"
            print(f"upload {path} (sha256 {sha256(path)}) to {where}")
    print(
        f"upload with: hf upload <org>/{folder.name} {folder} .   (older huggingface_hub: huggingface-cli upload, "
        "same arguments)"
    )
    return str(folder)


if __name__ == "__main__":
    fire.Fire(main)
