"""Write the downloadable bundle: ``<name>_v<version>.zip`` with one top-level folder ``<name>/``.

    python scripts/package_bundle.py --output_dir dist
    python scripts/package_bundle.py --output_dir dist --base_url https://example.org/segan/v0.1.0

The zip holds what the bundle needs to run where it is unpacked, and nothing else: ``configs/`` (without
``datalist*`` files, which name local data), ``models/`` (``model.pt``, ``model.ts`` if exported, its README),
``docs/``, the custom code ``bundle/`` and ``LICENSE``; ``models/model_recipe.json``, the settings the weights
were trained for (which inference, evaluation and MONAI Label read), is required and always shipped, and the
zip's ``configs/metadata.json`` describes those weights (input channels, output regions and label values); no tests, scripts, data, ``eval/``, ``checkpoints/`` or
caches. The version is ``configs/metadata.json``'s. It prints the zip's sha256 (the zip is byte-for-byte
reproducible: fixed order and timestamps), for the download page and ``monai.bundle download``'s users.

With ``--base_url`` it also writes ``large_files.yml`` into the bundle (url, sha256 ``hash_val`` and
``hash_type`` of each weight file, as model-zoo bundles have), so ``python -m monai.bundle
download_large_files --bundle_path <bundle>`` fetches and checks the weights once they are uploaded to
``<base_url>/<file name>``; ``--include_weights false`` then leaves them out of the zip.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

from bundle import __version__  # noqa: E402
from bundle.files import atomic_path  # noqa: E402
from bundle.checkpoints import read_recipe, recipe_path, segmentor_settings  # noqa: E402
from bundle.constants import LABEL_NAMES, REGION_LABEL_PRESETS, REGION_PRESETS  # noqa: E402

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
        ("features", settings["features"], recipe.get("features")), ("skip", settings["skip"], recipe.get("skip")),
        ("input channels", settings["in_channels"], in_channels or None),
        ("regions", settings["out_channels"], len(recipe["regions"]) if "regions" in recipe else None),
    ):
        if recorded is not None and saved != recorded:
            raise ValueError(f"'{model}' holds a segmentor with {name} {saved}, but its recipe says {recorded}.")
    print(f"models/model.pt: features {settings['features']}, skip '{settings['skip']}', "
          f"{settings['in_channels']} input channels, {settings['out_channels']} regions")
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
    formats["outputs"]["pred"]["num_channels"] = len(regions)
    formats["outputs"]["pred"]["channel_def"] = labels
    formats["post_processed_outputs"]["pred"]["channel_def"] = labels
    formats["post_processed_outputs"]["pred"]["value_range"] = [int(v) for v in labels]
    return metadata


def _large_files_yml(weights: list[Path], base_url: str) -> str:
    lines = ["large_files:"]
    for path in weights:
        lines += [
            f'  - path: "models/{path.name}"',
            f'    url: "{base_url.rstrip("/")}/{path.name}"',
            f'    hash_val: "{sha256(path)}"',
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


#: the bundle packaged unless another is given: this checkout
DEFAULT_BUNDLE_ROOT = str(ROOT)


def main(
    output_dir: str = "dist",
    bundle_root: str = DEFAULT_BUNDLE_ROOT,
    name: str = "segan",
    base_url: str = "",
    include_weights: bool = True,
) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` from ``bundle_root``, print its sha256, return its path."""
    root = Path(bundle_root).resolve()
    version = json.loads((root / "configs" / "metadata.json").read_text())["version"]
    if version != __version__:
        raise ValueError(
            f"configs/metadata.json says version {version} but bundle/__init__.py says {__version__}: bump both "
            "(and the metadata changelog) together."
        )
    models = root / "models"
    recipe = _check_weights(models / "model.pt")
    weights = [models / f for f in WEIGHT_FILES if (models / f).is_file()]

    members = {f"{name}/{p.relative_to(root).as_posix()}": p.read_bytes() for p in _code_and_configs(root)}
    metadata = _metadata(json.loads((root / "configs" / "metadata.json").read_text()), recipe)
    members[f"{name}/configs/metadata.json"] = (json.dumps(metadata, indent=4) + "\n").encode()
    members[f"{name}/models/model_recipe.json"] = Path(recipe_path(str(models / "model.pt"))).read_bytes()
    if (models / "README.md").is_file():
        members[f"{name}/models/README.md"] = (models / "README.md").read_bytes()
    if include_weights:
        members.update({f"{name}/models/{p.name}": p.read_bytes() for p in weights})
    elif not base_url:
        raise ValueError("--include_weights false needs --base_url: without large_files.yml nobody could get the weights.")
    if base_url:
        members[f"{name}/large_files.yml"] = _large_files_yml(weights, base_url).encode()

    out = Path(output_dir) / f"{name}_v{version}.zip"
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "x", zipfile.ZIP_DEFLATED) as archive:
        for arcname in sorted(members):
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[arcname])
    print(f"{len(members)} files in {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if base_url:
        for path in weights:
            print(f"upload {path} to {base_url.rstrip('/')}/{path.name} (listed in large_files.yml)")
    print(f"sha256 {sha256(out)}  {out.name}")
    return str(out)


if __name__ == "__main__":
    fire.Fire(main)
