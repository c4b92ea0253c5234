"""What several test modules share: the repository root, tiny training settings, the scripts as modules,
and 4D multi-modality files made from a demo case."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Config overrides that make a training run tiny: a few-kilobyte network on 32x32 slices, 2 epochs.
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
}


def messages(error: BaseException) -> str:
    """Every message in an exception's chain, one ``Type: message`` line each (MONAI wraps errors in config
    expression and "applying transform" errors, so the cause a check raised is further down)."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return "\n".join(f"{type(e).__name__}: {e}" for e in seen)


def small_train_parser(dataset_dir, **overrides):
    """A ``ConfigParser`` of ``configs/train.json`` on ``dataset_dir`` with small crops and batches (36x32x24
    volumes, 24x20 patches, 2 volumes x 5 slices, no loader processes), updated with ``overrides``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update(
        {
            "dataset_dir": dataset_dir,
            "num_workers": 0,
            "crop_size": [36, 32, 24],
            "patch_size": [24, 20],
            "slices_per_volume": 5,
            "volumes_per_batch": 2,
            **overrides,
        }
    )
    return parser


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, so a test can call its ``main``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stack_to_4d(files: Sequence, output_path) -> str:
    """Stack co-registered 3D files, in the given order, into one 4D (H, W, D, C) float32 NIfTI.

    This makes single-file multi-modality cases like those of MSD Task01 or a MONAI Label datastore
    out of a demo case; pass ``files`` in the channel order the case should have.
    """
    images = [nib.load(str(f)) for f in files]
    stacked = np.stack([np.asarray(image.get_fdata(dtype=np.float32)) for image in images], axis=-1)
    out = nib.Nifti1Image(stacked, images[0].affine)
    out.set_qform(images[0].affine, code=1)
    out.set_sform(images[0].affine, code=1)
    out.header.set_xyzt_units("mm")
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(output_path))
    return str(output_path)
