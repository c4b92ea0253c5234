"""Typed, ranged configuration: the user-facing keys are checked when a run starts, before any work.

A wrong override otherwise fails far from the key (``--max_epochs ten``: "'<' not supported between 'str' and
'int'" inside ignite; ``--regions "{}"``: "optimizer got an empty parameter list") or not at all
(``--threshold 1.5``: every map background, exit status 0). :func:`check_settings` reads each key of
:data:`SETTINGS` that the running config has, in table order, and raises at the first wrong one, naming the
key, the value given and what is accepted. The configs call it first in ``start_checks``.

Keys whose value follows from another (``regions`` from ``label_convention``) come after it in the table, so
the message names the key the user set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any

from .bootstrap import running_parser
from .constants import MODALITIES, MSD_MODALITIES, REGION_PRESETS
from .geometry import check_orientation
from .intensity import NORMALIZATION_MODES
from .postprocessing import enhancing_rule_regions, per_region

__all__ = ["SETTINGS", "check_settings", "check_value"]

_BOOLEAN_WORDS = ("true", "false", "yes", "no", "t", "f", "y", "n", "1", "0")


def _integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, Integral):
            return f"an integer >= {minimum}"
        return None if value >= minimum else f"an integer >= {minimum}"

    return check


def _number(low: float, high: float | None = None, open_low: bool = False, open_high: bool = False):
    def describe():
        if high is None:
            return f"a number {'>' if open_low else '>='} {low:g}"
        return f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def check(value):
        if isinstance(value, bool) or not isinstance(value, Real):
            return describe()
        too_low = value <= low if open_low else value < low
        too_high = high is not None and (value >= high if open_high else value > high)
        return describe() if too_low or too_high else None

    return check


def _sizes(count: int) -> Callable[[Any], str | None]:
    def check(value):
        ok = isinstance(value, (list, tuple)) and len(value) == count
        ok = ok and all(isinstance(v, Integral) and not isinstance(v, bool) and (v >= 1 or v == -1) for v in value)
        return None if ok else f"a list of {count} positive integers (-1: the whole axis), e.g. {[160] * count}"

    return check


def _per_region(one: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A post-processing key: ``one`` value for every region, a list in region order, or a mapping region name ->
    value (the number of values and the names are checked against the regions by :func:`check_settings`)."""

    def check(value):
        values = list(value.values()) if isinstance(value, Mapping) else value
        values = list(values) if isinstance(values, (list, tuple)) else [value]
        accepted = f"{one(None)}, or one such value per region (a list in region order, or a mapping region -> value)"
        return accepted if not values or any(one(v) for v in values) else None

    return check


def _one_of(choices) -> Callable[[Any], str | None]:
    def check(value):
        return None if value in choices else f"one of {', '.join(map(repr, choices))}"

    return check


def _boolean(value) -> str | None:
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOLEAN_WORDS):
        return None
    return "true or false"


def _regions(value) -> str | None:
    accepted = "a non-empty mapping of region name to a non-empty list of integer label values, e.g. {'tumor': [1]}"
    if not isinstance(value, Mapping) or not value:
        return accepted
    for labels in value.values():
        if not isinstance(labels, (list, tuple)) or not labels:
            return accepted
        if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 0 for v in labels):
            return accepted
    return None


def _pixdim(value) -> str | None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, Real) and not isinstance(v, bool) and v > 0 for v in value)
    return None if ok else "two positive in-plane voxel sizes in mm (the slice spacing is kept), e.g. [1.0, 1.0]"


def _reference_modality(value) -> str | None:
    known = sorted(set(MODALITIES) | set(MSD_MODALITIES))
    if value is None or value == "" or (isinstance(value, str) and value.lower() in known):
        return None
    return f"one of {known}, or null to refuse modalities stored on different grids"


def _modalities(value) -> str | None:
    known = sorted(set(MODALITIES) | set(MSD_MODALITIES))
    accepted = f"a non-empty list of distinct modalities among {known}"
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value):
        return accepted
    return None if all(isinstance(v, str) and v.lower() in known for v in value) else accepted


#: key -> check (``None`` if the value is accepted, else what is accepted), in the order they are read.
SETTINGS: dict[str, Callable[[Any], str | None]] = {
    "label_convention": _one_of(tuple(REGION_PRESETS)),
    "multiclass": _boolean,
    "regions": _regions,
    "modalities": _modalities,
    "reference_modality": _reference_modality,
    "context_slices": _integer(0),
    "slice_axis": _one_of([0, 1, 2]),
    "max_epochs": _integer(1),
    "val_interval": _integer(1),
    "crop_size": _sizes(3),
    "patch_size": _sizes(2),
    "slices_per_volume": _integer(1),
    "volumes_per_batch": _integer(1),
    "val_batch_slices": _integer(1),
    "num_workers": _integer(0),
    "seed": _integer(0),
    "cache_rate": _number(0.0, 1.0),
    "learning_rate": _number(0.0, open_low=True),
    "critic_learning_rate": _number(0.0, open_low=True),
    "lr_step_epochs": _integer(1),
    "lr_gamma": _number(0.0, open_low=True),
    "clip": _number(0.0),
    "dice_weight": _number(0.0),
    "critic_steps": _integer(1),
    "normalization": _one_of(NORMALIZATION_MODES),
    "orientation": check_orientation,
    "pixdim": _pixdim,
    "threshold": _per_region(_number(0.0, 1.0, open_low=True, open_high=True)),
    "min_component_size": _per_region(_integer(0)),
    "et_min_volume": _integer(0),
    "sw_batch_size": _integer(1),
    "foreground_margin": _integer(0),
    "slice_margin": _integer(0),
    "spatial_fit": _one_of(("pad", "crop")),
    "output_format": _one_of(("label", "regions")),
    "backend": _one_of(("pytorch", "onnxruntime")),
    "overlay_cases": _integer(0),
    "hd95_empty": _number(0.0),
    **{
        key: _boolean
        for key in (
            "amp",
            "resume",
            "progress",
            "continue_on_error",
            "val_whole_volume",
            "crop_foreground",
            "crop_slices",
            "lesion_wise",
            "save_predictions",
            "slice_major",
            "allow_constant_modality",
            "head_guard",
            "save_probabilities",
        )
    },
}


#: Keys that take one value per region (checked against the config's regions).
_PER_REGION = ("threshold", "min_component_size")


def check_value(key: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``key``, ``value`` and what is accepted, if :data:`SETTINGS` refuses it."""
    accepted = SETTINGS[key](value)
    if accepted is not None:
        raise ValueError(f"`{key}` is {value!r} ({type(value).__name__}); it must be {accepted}. Fix --{key}.")


def _has(parser, key: str) -> bool:
    """Whether the config has the top-level ``key``. ``key in parser`` answers the same, but for a missing key
    MONAI's lookup first ranks every key by similarity for its error message (8 ms each): over the ~50 keys
    checked here, most of them training keys absent from an inference config, that was 0.4 s of every run."""
    return key in parser.config


def _check_modalities_available(parser, value) -> None:
    """``modalities`` must be distinct and among the modalities the config reads (``image_modalities`` and
    ``image_modalities_4d``, the BraTS ones unless a user names their own, e.g. ``--image_modalities "['mri']"``)."""
    known = set()
    for key in ("image_modalities", "image_modalities_4d"):
        if _has(parser, key):
            known |= {str(m).lower() for m in parser.get_parsed_content(key) or []}
    known = sorted(known or set(MODALITIES) | set(MSD_MODALITIES))
    if (
        not isinstance(value, (list, tuple))
        or not value
        or len(set(value)) != len(value)
        or not all(isinstance(v, str) and v.lower() in known for v in value)
    ):
        raise ValueError(
            f"`modalities` is {value!r}; it must be a non-empty list of distinct modalities among {known} (the "
            "config's image_modalities). Fix --modalities, or name your own files' modalities with --image_modalities."
        )


def _check_reference_modality(parser, value) -> None:
    """``reference_modality`` (the grid modalities stored on different grids are resampled onto) must be one of
    ``image_modalities``, the modalities of a case's files; empty (``null``) refuses such cases instead."""
    if value is None or value == "":
        return
    known = (
        [str(m).lower() for m in parser.get_parsed_content("image_modalities")]
        if _has(parser, "image_modalities")
        else []
    )
    known = known or list(MODALITIES)
    if not isinstance(value, str) or value.lower() not in known:
        raise ValueError(
            f"`reference_modality` is {value!r}; it must be one of {known} (the config's image_modalities), or null to "
            "refuse modalities stored on different grids. Fix --reference_modality."
        )


def check_settings(parser=None) -> None:
    """Check every key of :data:`SETTINGS` that the config has, in order; raise at the first wrong value.

    Args:
        parser: the ``monai.bundle.ConfigParser`` to read; ``None``: the one running this call (configs call
            ``$@segan.settings_check.check_settings()`` from ``start_checks``).
    """
    parser = parser or running_parser()
    if parser is None:
        raise RuntimeError("check_settings() found no ConfigParser to read: pass one, or call it from a config.")
    for key in SETTINGS:
        if not _has(parser, key):
            continue
        raw = parser[key]
        try:
            value = parser.get_parsed_content(key)
        except Exception as error:
            raise ValueError(
                f"`{key}` ({raw!r}) cannot be evaluated: {type(error).__name__}: {error}. Check --{key} and the keys "
                "it is computed from."
            ) from error
        if key == "modalities":
            _check_modalities_available(parser, value)
        elif key == "reference_modality":
            _check_reference_modality(parser, value)
        else:
            check_value(key, value)
        if key in _PER_REGION and _has(parser, "regions"):
            per_region(value, list(parser.get_parsed_content("regions")), key, None)
        if key == "et_min_volume" and value > 0 and _has(parser, "regions"):
            enhancing_rule_regions(parser.get_parsed_content("regions"), key)
