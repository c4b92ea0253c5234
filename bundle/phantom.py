"""Synthetic BraTS-like cases as arrays: a head with one or two gliomas, four MR contrasts and a BraTS label map.

The cases imitate what SegAN sees in BRATS (Xue et al. 2018, section 3; Menze et al. 2015): four co-registered MR
contrasts of a head and
a label map with the BraTS 2018-2021 values 0 background, 1 necrotic core, 2 edema, 4 enhancing tumour.
:mod:`bundle.demo` writes them to disk as a dataset.

Each case is an ellipsoidal head (scalp, dark skull, CSF rim) around a brain whose white/grey-matter mix
and fine texture come from smoothed noise, with two CSF-filled "ventricles". One or two tumours sit at
random places in the brain: an irregular blob of edema (bright on T2 and FLAIR) holding an enhancing rim
(bright on T1c) around a necrotic core (dark on T1c, bright on T2). Contrasts follow MR physics loosely
(T1: white matter brighter than grey; T2: CSF bright; FLAIR: CSF dark, edema bright). A smooth
multiplicative bias field, Rician noise, partial-volume edges and a random gain per case and contrast make
the tumour overlap normal tissue in intensity, so no single threshold segments it, while a small 2D
network learns it in a few epochs. Background outside the head is exactly 0, as in skull-stripped BraTS.

That default is easy: a small network reaches whole-tumour Dice 0.96 in a minute, so methods tie on it.
``difficulty`` (0 = the default, 1 = hard; ``DIFFICULTY_RANGE``) raises the noise and the bias field,
lowers the tumours' contrast against normal brain and their size, and perturbs the labels at region
borders, so that methods can be told apart (``scripts/ablation.py``).

Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: the same seed gives identical
arrays, and case ``i`` does not depend on how many cases are made.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

__all__ = [
    "CONTRASTS",
    "DIFFICULTY_RANGE",
    "difficulty_settings",
    "check_shape",
    "make_demo_case",
    "border_label_noise",
    "CAVITY_LABEL",
]

#: Label value of the resection cavity that :func:`make_demo_case` paints with ``resection_cavity=True`` (the
#: BraTS 2024 post-treatment glioma label RC, de Verdier et al. 2024).
CAVITY_LABEL = 4

_MIN_SIZE = 24

# Mean intensity of each tissue per contrast (t1, t1c, t2, flair) before bias, texture, noise and gain.
_TISSUE = {
    "scalp": (0.85, 0.88, 0.55, 0.70),
    "skull": (0.08, 0.08, 0.10, 0.06),
    "csf": (0.15, 0.16, 1.00, 0.10),
    "grey": (0.45, 0.47, 0.55, 0.50),
    "white": (0.65, 0.66, 0.36, 0.40),
    "edema": (0.38, 0.40, 0.82, 0.74),
    "enhancing": (0.42, 0.95, 0.62, 0.62),
    "necrosis": (0.22, 0.20, 0.90, 0.50),
    # a resection cavity (post-treatment): fluid, dark on T1/T1c, bright on T2, its FLAIR a little above CSF's
    "cavity": (0.18, 0.20, 0.95, 0.22),
}
#: The contrasts of a case, in the order :func:`make_demo_case` draws them.
CONTRASTS = ("t1", "t1c", "t2", "flair")
_NOISE_SIGMA = 0.04  # Rician noise level, relative to the tissue means above
_BIAS_AMPLITUDE = 0.15  # the bias field's log-amplitude: about +-15 %

#: What ``difficulty`` changes between 0 (the default demo, the same arrays as before the setting existed) and
#: 1 (hard), each by linear interpolation. Contrast 0.5 pulls each tumour tissue's mean intensity halfway
#: towards the normal brain's; label noise is the probability that a voxel on a border between two labels
#: takes the label of a random 6-neighbour instead (annotators disagree at borders).
DIFFICULTY_RANGE = {
    "noise_sigma": (_NOISE_SIGMA, 0.14),
    "bias_amplitude": (_BIAS_AMPLITUDE, 0.45),
    "lesion_contrast": (1.0, 0.4),
    "lesion_size": (1.0, 0.6),
    "border_label_noise": (0.0, 0.3),
}


def difficulty_settings(difficulty: float = 0.0) -> dict[str, float]:
    """The generator's settings at ``difficulty`` (0 default ... 1 hard), see ``DIFFICULTY_RANGE``."""
    d = float(difficulty)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"demo difficulty must be between 0 (the default demo) and 1 (hard), got {difficulty}.")
    return {k: easy + d * (hard - easy) for k, (easy, hard) in DIFFICULTY_RANGE.items()}


_BASE_GAIN = 1000.0  # scanner units: tissue means end up roughly in 0..1200


def check_shape(shape) -> tuple[int, int, int]:
    """``shape`` (a sequence, or text such as ``"[96, 96, 64]"`` from the command line) as three sizes, checked."""
    if isinstance(shape, str):
        shape = [int(s) for s in shape.strip("()[] ").replace(",", " ").split()]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < _MIN_SIZE:
        raise ValueError(f"shape must be three sizes of at least {_MIN_SIZE} voxels (H, W, D), got {shape}.")
    return shape


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit standard deviation (float32)."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, mode="reflect", truncate=3.0)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _ramp(distance: np.ndarray, width: float) -> np.ndarray:
    """Soft membership of ``distance < 1`` (0.5 on the boundary, linear over ``width``): partial-volume edges."""
    return np.clip(0.5 + (1.0 - distance) / width, 0.0, 1.0).astype(np.float32)


def _ellipsoid_distance(grid, center, radii) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid ``(center, radii)``, on an ``np.ogrid`` grid."""
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))).astype(np.float32)


def _tumour(rng, shape, brain, head_center, head_radii, size: float = 1.0):
    """One tumour: soft memberships (edema, core, necrosis) and hard masks, computed in a bounding box.

    Returns ``(box, soft, hard)`` where ``box`` is a tuple of slices into the volume, ``soft`` and ``hard`` are
    dicts with keys ``"edema"``, ``"core"``, ``"necrosis"``; core (enhancing rim + necrosis) lies inside the
    edema and the necrosis inside the rim, as in BraTS high-grade gliomas: a draw where the core touches
    anything but edema, or the necrosis anything but the rim (6-connectivity), is drawn again. ``size`` scales
    the edema radii (the demo's difficulty setting).
    """
    for _ in range(200):
        # centre: uniform in the central 55 % (by radius) of the brain ellipsoid
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        depth = 0.85 * 0.55 * rng.uniform(0.0, 1.0) ** (1 / 3)
        center = np.asarray(head_center) + direction * depth * np.asarray(head_radii)
        # edema radii: 30-50 % of the head radius (15-25 % of the head size), anisotropic
        edema_radii = np.asarray(head_radii) * rng.uniform(0.3, 0.5) * rng.uniform(0.8, 1.2, 3)
        if size != 1.0:
            edema_radii = edema_radii * size
        edema_radii = np.maximum(edema_radii, 4.0)
        core_radii = np.maximum(edema_radii * rng.uniform(0.5, 0.7), 2.5)
        core_center = center + rng.uniform(-0.2, 0.2, 3) * (edema_radii - core_radii)
        necrosis_level = rng.uniform(0.5, 0.7)
        edema_amp, core_amp = rng.uniform(0.12, 0.22), rng.uniform(0.06, 0.12)

        # the box holds every voxel the perturbed distance can bring below 1 (noise is clipped to +-2.5 sd)
        half = np.ceil(edema_radii * (1 + 2.5 * edema_amp)).astype(int) + 3
        lo = np.maximum(np.floor(center).astype(int) - half, 0)
        hi = np.minimum(np.floor(center).astype(int) + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        box_shape = tuple(hi - lo)
        grid = np.ogrid[box]
        sigma = max(1.0, float(np.mean(edema_radii)) / 3)
        # irregular outlines: the ellipsoidal distance shifted by smooth noise
        d_edema = _ellipsoid_distance(grid, center, edema_radii) + edema_amp * np.clip(
            _smooth_noise(rng, box_shape, sigma), -2.5, 2.5
        )
        d_core = _ellipsoid_distance(grid, core_center, core_radii) + core_amp * np.clip(
            _smooth_noise(rng, box_shape, sigma / 2), -2.5, 2.5
        )
        inside = brain[box]
        width = 1.5 / float(np.mean(edema_radii))
        soft = {
            "edema": _ramp(d_edema, width) * inside,
            "core": _ramp(d_core, 1.5 / float(np.mean(core_radii))) * inside,
            "necrosis": _ramp(d_core / necrosis_level, 1.5 / float(np.mean(core_radii) * necrosis_level)) * inside,
        }
        hard = {"edema": (d_edema < 1) & inside}
        hard["core"] = (d_core < 1) & hard["edema"]
        hard["necrosis"] = (d_core < necrosis_level) & hard["core"]
        rim = hard["core"] & ~hard["necrosis"]
        nested = (
            not (binary_dilation(hard["core"]) & ~hard["edema"]).any()
            and not (binary_dilation(hard["necrosis"]) & ~hard["core"]).any()
        )
        if nested and hard["necrosis"].sum() >= 4 and rim.sum() >= 8 and (hard["edema"] & ~hard["core"]).sum() >= 8:
            soft["core"] = np.minimum(soft["core"], soft["edema"])
            soft["necrosis"] = np.minimum(soft["necrosis"], soft["core"])
            return box, soft, hard
    raise RuntimeError(f"could not place a tumour with necrosis, rim and edema in a volume of shape {shape}.")


def _cavity(rng, shape, brain, tumour, head_center, head_radii):
    """A resection cavity: soft membership and hard mask of an ellipsoid in the brain, outside every tumour.

    Its centre is drawn like a tumour's; the radii are 20-30 % of the head's. A draw with fewer than 8 voxels
    left outside the tumours is drawn again.
    """
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(200):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        center = np.asarray(head_center) + direction * 0.5 * rng.uniform(0.0, 1.0) * np.asarray(head_radii)
        radii = np.maximum(np.asarray(head_radii) * rng.uniform(0.2, 0.3) * rng.uniform(0.8, 1.2, 3), 2.5)
        distance = _ellipsoid_distance(grid, center, radii)
        hard = (distance < 1) & brain & ~tumour
        if hard.sum() >= 8:
            soft = _ramp(distance, 1.5 / float(np.mean(radii))) * brain * ~tumour
            return soft, hard
    raise RuntimeError(f"could not place a resection cavity outside the tumours in a volume of shape {shape}.")


def make_demo_case(
    shape=(96, 96, 64),
    seed: int = 0,
    index: int = 0,
    difficulty: float = 0.0,
    background_noise: float = 0.0,
    resection_cavity: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Arrays of one synthetic case: ``({"t1", "t1c", "t2", "flair"} -> float32 (H, W, D), uint8 label)``.

    Axial slices run along the last axis. Labels use the BraTS 2018-2021 values {0, 1, 2, 4}. ``difficulty``
    (0 to 1, see ``DIFFICULTY_RANGE``) adds noise and bias, lowers the tumour's contrast and size and perturbs
    the labels at borders; at 0 the arrays are exactly those of the default demo. The extra label noise is
    drawn from its own generator, so the image draws are the same at every difficulty.
    ``background_noise`` > 0 fills the air outside the head with Rician (Rayleigh) noise whose sigma is that
    fraction of the case's mean head intensity (per contrast), as in scans that are not skull-stripped and
    masked; 0 leaves the air at exactly 0, as in BraTS. The head and labels are the same either way.
    ``resection_cavity`` adds a post-treatment resection cavity (fluid-filled, label ``CAVITY_LABEL``) in the
    brain outside the tumours, drawn from a stream of its own so the tumours are those of the case without it;
    the label map then has the BraTS 2024 post-treatment values (de Verdier et al. 2024): 1 non-enhancing
    tumour core, 2 surrounding FLAIR hyperintensity, 3 enhancing tissue, 4 resection cavity.
    """
    shape = check_shape(shape)
    settings = difficulty_settings(difficulty)
    rng = np.random.default_rng([int(seed), int(index)])
    size = np.asarray(shape, dtype=np.float64)
    head_center = size / 2 - 0.5 + rng.uniform(-0.02, 0.02, 3) * size
    head_radii = size * np.array([0.42, 0.45, 0.43]) * rng.uniform(0.93, 1.03)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    r_head = _ellipsoid_distance(grid, head_center, head_radii)

    head = r_head < 1.0
    # a slightly irregular brain surface and grey/white boundary, from smooth noise
    coarse = _smooth_noise(rng, shape, sigma=max(1.5, min(shape) / 24))
    fine = _smooth_noise(rng, shape, sigma=1.0)
    r_brain = r_head / 0.85 * (1 + 0.015 * coarse)
    brain = r_brain < 1.0
    white = np.clip(0.5 + (0.7 - r_brain + 0.1 * coarse) / 0.08, 0.0, 1.0)
    ventricles = np.zeros(shape, np.float32)
    for side in (-1, 1):
        center = head_center + np.array([side * 0.13, -0.05, 0.06]) * head_radii
        radii = np.maximum(np.array([0.07, 0.26, 0.15]) * head_radii, 1.0)
        ventricles = np.maximum(ventricles, _ramp(_ellipsoid_distance(grid, center, radii), 0.3))

    tumours = [
        _tumour(rng, shape, brain, head_center, head_radii, settings["lesion_size"])
        for _ in range(int(rng.integers(1, 3)))
    ]
    soft = {k: np.zeros(shape, np.float32) for k in ("edema", "core", "necrosis")}
    label = np.zeros(shape, np.uint8)
    hard = {k: np.zeros(shape, bool) for k in ("edema", "core", "necrosis")}
    for box, t_soft, t_hard in tumours:
        for k in soft:
            soft[k][box] = np.maximum(soft[k][box], t_soft[k])
            hard[k][box] |= t_hard[k]
    label[hard["edema"]] = 2
    label[hard["core"]] = 4
    label[hard["necrosis"]] = 1
    cavity = None
    if resection_cavity:
        cavity_rng = np.random.default_rng([int(seed), int(index), 2])
        cavity, cavity_hard = _cavity(cavity_rng, shape, brain, hard["edema"], head_center, head_radii)
        label[hard["core"] & ~hard["necrosis"]] = 3  # BraTS 2023+ enhancing, so that 4 can be the cavity
        label[cavity_hard] = CAVITY_LABEL
    if settings["border_label_noise"] > 0:
        label = border_label_noise(
            label, settings["border_label_noise"], np.random.default_rng([int(seed), int(index), 1])
        )
    tumour_texture = _smooth_noise(rng, shape, sigma=1.5)

    images = {}
    coords = [
        np.linspace(-1.0, 1.0, s, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)])
        for a, s in enumerate(shape)
    ]
    for c, contrast in enumerate(CONTRASTS):
        t = {k: v[c] for k, v in _TISSUE.items()}
        if settings["lesion_contrast"] != 1.0:  # tumour tissues pulled towards the normal brain's mean
            normal = (t["white"] + t["grey"]) / 2
            for k in ("edema", "enhancing", "necrosis"):
                t[k] = normal + settings["lesion_contrast"] * (t[k] - normal)
        brain_tissue = white * t["white"] + (1 - white) * t["grey"]
        brain_tissue = brain_tissue * (1 - ventricles) + ventricles * t["csf"]
        image = np.where(r_head >= 0.94, t["scalp"], np.where(r_head >= 0.88, t["skull"], t["csf"]))
        image = np.where(brain, brain_tissue, image).astype(np.float32)
        image *= 1 + 0.05 * fine
        tumour_tex = 1 + 0.07 * tumour_texture
        image = image * (1 - soft["edema"]) + soft["edema"] * t["edema"] * tumour_tex
        image = image * (1 - soft["core"]) + soft["core"] * t["enhancing"] * tumour_tex
        image = image * (1 - soft["necrosis"]) + soft["necrosis"] * t["necrosis"] * tumour_tex
        if cavity is not None:
            image = image * (1 - cavity) + cavity * t["cavity"]
        # smooth multiplicative bias field: exp of a random quadratic polynomial, about +-15 % by default
        a = rng.normal(0.0, 1.0, 9)
        x, y, z = coords
        poly = a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * y * z + a[5] * x * z
        poly = poly + a[6] * x * x + a[7] * y * y + a[8] * z * z
        image *= np.exp(settings["bias_amplitude"] * poly / max(float(np.abs(poly).max()), 1e-6))
        # Rician noise: magnitude of a complex signal with gaussian noise on both channels
        n_re = rng.standard_normal(shape, dtype=np.float32) * settings["noise_sigma"]
        n_im = rng.standard_normal(shape, dtype=np.float32) * settings["noise_sigma"]
        image = np.sqrt((image + n_re) ** 2 + n_im**2)
        gain = _BASE_GAIN * rng.uniform(0.8, 1.25)
        images[contrast] = np.where(head, image * gain, 0.0).astype(np.float32)
    if background_noise > 0:
        # a stream of its own, so the head and labels are those of the noise-free case
        air_rng = np.random.default_rng([int(seed), int(index), 1])
        for contrast in images:
            sigma = background_noise * float(images[contrast][head].mean())
            n_re, n_im = air_rng.standard_normal((2, *shape), dtype=np.float32) * sigma
            images[contrast] = np.where(head, images[contrast], np.sqrt(n_re**2 + n_im**2)).astype(np.float32)
    return images, label


def border_label_noise(label: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """``label`` where each voxel with a differently labelled 6-neighbour takes, with ``probability``, the label
    of one of its 6 neighbours drawn at random (border disagreement between annotators)."""
    padded = np.pad(label, 1, mode="edge")
    centre = tuple(slice(1, -1) for _ in range(3))
    neighbours = []
    for axis in range(3):
        for step in (-1, 1):
            view = list(centre)
            view[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            neighbours.append(padded[tuple(view)])
    neighbours = np.stack(neighbours)
    border = (neighbours != label).any(axis=0)
    flip = border & (rng.random(label.shape) < probability)
    pick = rng.integers(0, len(neighbours), size=label.shape)
    noisy = label.copy()
    noisy[flip] = np.take_along_axis(neighbours, pick[None], axis=0)[0][flip]
    return noisy
