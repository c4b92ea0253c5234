"""Synthetic dermoscopy images, so the 2D RGB skin-lesion setting (ISIC 2017, Codella et al. 2018; the SegAN ISIC
re-implementation report) runs offline on a CPU.

Each image is skin-coloured with a smooth blotchy texture and fine grain; an irregular pigmented lesion (a
star-shaped blob whose radius varies with a few random harmonics, darker and more saturated towards its
centre, with pigment mottling and a soft rim) sits near the centre; a few dark hairs cross it and the skin;
the dermoscope's vignetting darkens the corners. Image sizes vary, so outputs at the original size are
testable. The mask is the lesion (0 / 255), hairs not excluded, as in ISIC's ground truth.

Files follow the ISIC 2017 layout, which :func:`bundle.cases.find_image_pairs` reads like the real thing::

    <out>/ISIC-2017_Training_Data/ISIC_<id>.jpg
    <out>/ISIC-2017_Training_Part1_GroundTruth/ISIC_<id>_segmentation.png

likewise ``Validation`` and ``Test``. Everything is drawn from ``numpy.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

__all__ = ["LESION_DEMO_MANIFEST", "make_lesion_image", "make_lesion_dataset", "ensure_lesion_demo"]

#: File written last into a generated dataset; it records the parameters and marks the dataset complete.
LESION_DEMO_MANIFEST = "lesion_demo.json"
_GENERATOR_VERSION = 1
_SPLITS = {"Training": 0, "Validation": 1, "Test": 2}


def _smooth(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def make_lesion_image(height: int, width: int, seed: int = 0, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy image: ``(rgb uint8 (H, W, 3), mask uint8 (H, W) of 0 / 255)``."""
    rng = np.random.default_rng([int(seed), int(index)])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)

    skin = np.array([222.0, 178.0, 152.0]) + rng.normal(0, 12, 3)
    texture = 10 * _smooth(rng, (height, width), sigma=min(height, width) / 10) + 3 * rng.standard_normal(
        (height, width)
    )
    image = skin[None, None] * (1 + 0.04 * _smooth(rng, (height, width, 1), sigma=4)) + texture[..., None]

    # the lesion: r(theta) = r0 * (1 + sum a_k cos(k theta + phi_k)), k = 2..6
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    r0 = min(height, width) * rng.uniform(0.15, 0.3)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0, 0.25 / k**0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    distance = np.hypot(yy - cy, xx - cx) / (r0 * (1 + wobble))
    mask = distance < 1.0
    pigment = np.array([105.0, 62.0, 45.0]) + rng.normal(0, 10, 3)
    rim = np.clip((1.0 - distance) / 0.12 + 0.5, 0, 1)  # soft edge over a few pixels
    depth = np.clip(1.15 - 0.5 * distance + 0.15 * _smooth(rng, (height, width), sigma=3), 0, 1.2)
    alpha = (rim * rng.uniform(0.75, 0.95) * depth)[..., None]
    image = image * (1 - alpha) + (pigment[None, None] * (0.8 + 0.2 * (1 - depth[..., None]))) * alpha

    # hairs: thin dark quadratic curves, over lesion and skin alike
    for _ in range(rng.integers(1, 6)):
        points = rng.uniform([0, 0], [height, width], size=(3, 2))
        t = np.linspace(0, 1, 4 * (height + width))[:, None]
        curve = (1 - t) ** 2 * points[0] + 2 * t * (1 - t) * points[1] + t**2 * points[2]
        hair = np.zeros((height, width))
        rows, cols = np.clip(curve.round().astype(int), 0, [height - 1, width - 1]).T
        hair[rows, cols] = 1.0
        hair = np.clip(gaussian_filter(hair, sigma=rng.uniform(0.5, 0.9)) * 3, 0, 1)[..., None]
        image = image * (1 - hair) + np.array([45.0, 30.0, 25.0]) * hair

    # vignetting of the dermoscope: darker towards the corners
    radius = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2)) / np.sqrt(2)
    image *= (1 - rng.uniform(0.3, 0.6) * radius**2.5)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def _params(num_images, seed) -> dict:
    return {"generator_version": _GENERATOR_VERSION, "num_images": [int(n) for n in num_images], "seed": int(seed)}


def _image_id(split: str, i: int) -> str:
    return f"ISIC_{_SPLITS[split]}{i:06d}"


def _is_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / LESION_DEMO_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in params} != params:
        return False
    return all(
        (out / f"ISIC-2017_{split}_Data" / f"{_image_id(split, i)}.jpg").is_file()
        and (out / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{_image_id(split, i)}_segmentation.png").is_file()
        for split, n in zip(_SPLITS, params["num_images"])
        for i in range(n)
    )


def make_lesion_dataset(output_dir, num_images=(60, 12, 12), seed: int = 0, progress: bool = False) -> str:
    """Write training, validation and test images (``num_images``) in the ISIC 2017 layout; return ``output_dir``.

    Sizes vary between 96 and 160 pixels a side. The dataset is written into a hidden sibling folder renamed to
    ``output_dir`` at the end, so an interrupted run leaves nothing half-written; an existing lesion demo there
    (or an empty folder) is replaced, any other folder refused.
    """
    out = Path(output_dir)
    if out.exists() and not (out.is_dir() and ((out / LESION_DEMO_MANIFEST).is_file() or not any(out.iterdir()))):
        raise FileExistsError(f"'{output_dir}' exists and is not a lesion demo dataset: choose another folder.")
    if len(num_images) != 3 or min(num_images) < 0 or num_images[0] < 1:
        raise ValueError(f"num_images is (training >= 1, validation, test) image counts, got {num_images}.")
    params = _params(num_images, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        total = sum(num_images)
        bar = tqdm(total=total, desc="lesion images", unit="image", disable=not progress)
        for split, n in zip(_SPLITS, num_images):
            data, truth = tmp / f"ISIC-2017_{split}_Data", tmp / f"ISIC-2017_{split}_Part1_GroundTruth"
            data.mkdir(parents=True)
            truth.mkdir(parents=True)
            for i in range(n):
                index = _SPLITS[split] * 100_000 + i
                size = np.random.default_rng([int(seed), index, 7]).integers(96, 161, size=2)
                rgb, mask = make_lesion_image(int(size[0]), int(size[1]), seed, index)
                Image.fromarray(rgb).save(data / f"{_image_id(split, i)}.jpg", quality=90)
                Image.fromarray(mask).save(truth / f"{_image_id(split, i)}_segmentation.png")
                bar.update()
        bar.close()
        (tmp / LESION_DEMO_MANIFEST).write_text(
            json.dumps({**params, "layout": "ISIC 2017"}, indent=2), encoding="utf-8"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(output_dir)


def ensure_lesion_demo(output_dir, num_images=(60, 12, 12), seed: int = 0, progress: bool = False) -> str:
    """``output_dir``, after generating the lesion demo there unless it already holds one with these parameters."""
    if not _is_complete(Path(output_dir), _params(num_images, seed)):
        make_lesion_dataset(output_dir, num_images=num_images, seed=seed, progress=progress)
    return str(output_dir)
