"""Saving and finding trained weights and training states, so that a crash never costs more than the last
interval and a bad file never becomes the model.

- :class:`SafeCheckpointSaver`: MONAI's ``CheckpointSaver``, crash-safe: every file is written atomically
  (temporary file, fsync, rename), an older file is deleted only once its successor is complete, weights
  holding NaN or infinite values are never saved, and the best key metric survives a resume.
- :func:`trained_weights`: the segmentor for inference and evaluation, checked before it is loaded (a file
  that does not load, or holds NaN or infinite weights, is refused naming it).
- :func:`latest_training_state`: the newest training state that loads, for ``--resume``.

The functions are called from the configs (a ``CheckpointLoader``'s ``load_path``) and fail with what to do
instead of a bare ``torch.load`` error.

A model's recipe travels with it: training writes, beside ``models/model.pt`` and each time it is saved, the
settings that define the network and what it expects as input (:data:`RECIPE_SETTINGS`) in
``models/model_recipe.json`` (:func:`recipe_path`). Inference, evaluation, export and MONAI Label read their
defaults from it (``inference.json``'s ``recipe``), so a bundle serves whatever it trained without hand edits
(MONAI Label and ``monai.bundle.load`` take no command-line overrides); an explicit override that contradicts
it is an error naming the setting and both values (:func:`check_recipe`). Training from scratch reads nothing
from an old ``model.pt``; a training that starts from weights (``--init_ckpt``, ``--resume``, MONAI Label's
``/train``) builds the network its recipe records (:func:`fine_tune_source`, :func:`start_recipe`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import, str2bool

from .files import atomic_path, write_atomic

BaseSaveHandler, _ = optional_import(
    "ignite.handlers.checkpoint", IgniteInfo.OPT_IMPORT_VERSION, min_version, "BaseSaveHandler"
)
Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

__all__ = [
    "SafeCheckpointSaver",
    "non_finite_entries",
    "trained_weights",
    "fine_tune_source",
    "start_recipe",
    "segmentor_settings",
    "latest_training_state",
    "RECIPE_SETTINGS",
    "recipe_path",
    "read_recipe",
    "write_recipe",
    "check_recipe",
    "checked_features",
]

logger = logging.getLogger(__name__)

_ENCODER_CONV_LEVEL = re.compile(r"encoder\.(\d+)\.conv\.weight")
_HEAD_CONV = "head.1.conv.weight"


def segmentor_settings(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{"features", "skip", "in_channels", "out_channels"}`` of the segmentor whose state dict is ``state``.

    Raises ``ValueError`` when ``state`` is not a SegAN segmentor's state dict.
    """
    convs = sorted(((int(m.group(1)), k) for k in state if (m := _ENCODER_CONV_LEVEL.fullmatch(k))), key=lambda t: t[0])
    if not convs or _HEAD_CONV not in state:
        raise ValueError("not a state dict of bundle.networks.SegANSegmentor (no encoder.N.conv / head.1.conv weights)")
    features = [int(state[k].shape[0]) for _, k in convs]
    head = state[_HEAD_CONV]
    return {
        "features": features,
        "skip": "cat" if int(head.shape[1]) == 2 * features[0] else "add",
        "in_channels": int(state[convs[0][1]].shape[1]),
        "out_channels": int(head.shape[0]),
    }


#: Entries of a full training state (``configs/train.json``'s ``train#state``) besides the segmentor's ``network``.
TRAINING_STATE_KEYS = frozenset({"trainer", "optimizer", "critic", "critic_optimizer", "model_saver"})


def _load_state(path: str) -> Mapping[str, torch.Tensor]:
    state = _load(path, "Point --ckpt_path at a complete model.pt, or train again.")
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a {"model": state dict} checkpoint, which CheckpointLoader also accepts
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping) and TRAINING_STATE_KEYS & set(state):
        raise ValueError(
            f"'{path}' is a training state (entries {sorted(state)}: what --resume true reads to continue a "
            "training), not a model's weights. Point --ckpt_path at the model.pt training saved beside its "
            "checkpoints folder (models/model.pt: the best validation's weights), or, to continue that training, "
            f"run configs/train.json with --resume true --state_dir '{os.path.dirname(os.path.abspath(path))}'."
        )
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict of network_def.")
    return state


#: The settings a segmentor's weights are trained for, recorded beside them (``configs/train.json``'s ``recipe``).
RECIPE_SETTINGS = (
    "features",
    "skip",
    "modalities",
    "context_slices",
    "slice_axis",
    "normalization",
    "orientation",
    "pixdim",
    "label_convention",
    "regions",
    "region_labels",
    "multiclass",
    "ensemble",
)


def recipe_path(ckpt_path: str) -> str:
    """Where the recipe of the weights in ``ckpt_path`` is kept: ``models/model.pt`` -> ``models/model_recipe.json``."""
    return os.path.splitext(str(ckpt_path))[0] + "_recipe.json"


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, keys as text), so that settings compare as saved."""
    return json.loads(json.dumps(value))


def write_recipe(ckpt_path: str, recipe: Mapping[str, Any]) -> str:
    """Write ``recipe`` (the settings of :data:`RECIPE_SETTINGS`) beside ``ckpt_path``, atomically; its path."""
    unknown = sorted(set(recipe) - set(RECIPE_SETTINGS))
    if unknown:
        raise ValueError(f"recipe settings {unknown} are not among {list(RECIPE_SETTINGS)}.")
    path = recipe_path(ckpt_path)
    write_atomic(path, (json.dumps(_plain(dict(recipe)), indent=4) + "\n").encode())
    return path


def read_recipe(ckpt_path: str) -> dict[str, Any]:
    """The recipe recorded beside ``ckpt_path``; ``{}`` when there is none (weights from before records, or
    from elsewhere: the config's settings then apply, and loading checks the shapes)."""
    path = recipe_path(ckpt_path)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read the recipe '{path}' of '{ckpt_path}': {error}. Restore it from the training run, or delete "
            "it and pass every setting the weights were trained with."
        ) from error
    if not isinstance(recipe, dict):
        raise ValueError(f"the recipe '{path}' holds a {type(recipe).__name__}, not a mapping of settings.")
    return recipe


def check_recipe(ckpt_path: str, recipe: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse ``settings`` (the run's values) that contradict the ``recipe`` of the weights in ``ckpt_path``.

    The configs take their defaults from the recipe, so a difference is an explicit override: the error names
    the setting and both values.
    """
    for name, value in settings.items():
        if name in recipe and _plain(value) != _plain(recipe[name]):
            raise ValueError(
                f"`{name}` is {_plain(value)!r} in this run, but the weights in '{ckpt_path}' were trained with "
                f"{name} {_plain(recipe[name])!r} (recorded in '{recipe_path(ckpt_path)}'). Drop the --{name} "
                "override to use the recorded value, or point --ckpt_path at weights trained with it."
            )


def fine_tune_source(init_ckpt: str, ckpt_path: str, resuming: Any = False, first_handler: Any = None) -> str:
    """The weights a training starts from, whose recipe its network follows; ``""`` for a training from scratch.

    A training from scratch never takes a setting from an old ``model.pt``: its network is the config's. A
    training that continues from weights takes their widths and skip mode (:func:`start_recipe`):

    - ``init_ckpt`` (``--init_ckpt <model.pt>``): fine-tune those weights;
    - ``resuming`` (``--resume true``): the run's own ``ckpt_path``, written with the state being resumed;
    - MONAI Label's ``/train``, which puts a ``CheckpointLoader`` of the served ``models/model.pt`` first in
      ``train#handlers``: ``ckpt_path``, the served weights. ``first_handler`` is the ``_target_`` of that list's
      first entry; ``None`` reads it from the raw config of the ``ConfigParser`` running this call (a list
      that is empty, or whose first entry is a reference, has none).
    """
    if first_handler is None:
        from .bootstrap import running_parser

        parser = running_parser()
        handlers = parser.get("train#handlers", []) if parser is not None else []
        first = handlers[0] if isinstance(handlers, list) and handlers else None
        first_handler = first.get("_target_", "") if isinstance(first, Mapping) else ""
    if init_ckpt:
        if not os.path.isfile(str(init_ckpt)):
            raise FileNotFoundError(
                f"init_ckpt '{init_ckpt}' is not a file: point --init_ckpt at the model.pt to fine-tune, or drop it "
                "to train from scratch."
            )
        return str(init_ckpt)
    resuming = str2bool(resuming) if isinstance(resuming, str) else bool(resuming)
    served = isinstance(first_handler, str) and first_handler.rsplit(".", 1)[-1] == "CheckpointLoader"
    if (resuming or served) and ckpt_path and os.path.isfile(str(ckpt_path)):
        return str(ckpt_path)
    return ""


def start_recipe(path: str) -> dict[str, Any]:
    """The recipe of the weights a training starts from (:func:`fine_tune_source`); ``{}`` from scratch.

    Weights with no recipe record (from before records, or from elsewhere) give the widths and skip mode their
    tensors have, with a warning, so that a non-strict loader (MONAI Label's) never loads them in part.
    """
    if not path:
        return {}
    recipe = read_recipe(path)
    if recipe:
        logger.info(f"starting from '{path}': network settings from its recipe '{recipe_path(path)}'.")
        return recipe
    state = _load_state(path)  # a file that does not load, or a training state, is refused here naming it
    try:
        settings = segmentor_settings(state)
    except ValueError:
        return {}  # weights of another network_def (an overlay's): the config decides, the loader checks
    logger.warning(
        f"'{path}' has no recipe record ('{recipe_path(path)}'): starting from its widths {settings['features']} "
        f"and skip '{settings['skip']}' as its tensors give them; pass the other settings it was trained with."
    )
    return {"features": settings["features"], "skip": settings["skip"]}


def checked_features(
    ckpt_path: str,
    features: Any,
    skip: str,
    in_channels: int,
    out_channels: int,
    recipe: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Any:
    """``features``, once the segmentor weights in ``ckpt_path`` (if any) are seen to fit these settings.

    ``network_def`` depends on it, so that weights made for other settings are refused naming the setting,
    instead of being loaded in part: MONAI's non-strict loaders (``monai.bundle.load``) silently skip every
    tensor whose shape differs. The weights' shapes are only checked here; the settings come from the config
    and the recipe. With ``recipe`` and ``settings``, a setting that contradicts the recipe is refused first
    (:func:`check_recipe`), naming both values.
    """
    if recipe and settings:
        check_recipe(ckpt_path, recipe, settings)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return features
    try:
        saved = segmentor_settings(_load_state(ckpt_path))
    except ValueError:  # weights of another network_def (an overlay's): checked when they load
        return features
    for key, expected, what in (
        ("in_channels", in_channels, "modalities` and `context_slices"),
        ("out_channels", out_channels, "regions"),
        ("features", list(features), "features"),
        ("skip", skip, "skip"),
    ):
        if saved[key] != expected:
            raise ValueError(
                f"the segmentor in '{ckpt_path}' has {saved[key]} {key.replace('_', ' ')} but the config gives "
                f"{expected} (from `{what}`). Run with the `{what}` it was trained with (its recipe, "
                f"'{recipe_path(ckpt_path)}', records them), or point --ckpt_path at weights trained with these."
            )
    return features


def non_finite_entries(state: Any, limit: int = 3) -> list[str]:
    """Names (dotted paths) of the first ``limit`` floating-point tensors in ``state`` holding NaN or infinity."""
    found: list[str] = []

    def walk(value: Any, name: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else str(i))

    walk(state, "")
    return found


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler behind :class:`SafeCheckpointSaver`: atomic writes, deletions after the next write.

    ignite's ``Checkpoint`` asks to remove the file a new one supersedes *before* it writes the new one (and
    MONAI's ``DiskSaver`` writes in place): a crash in between leaves no valid file. Here ``remove`` only
    records the file; it is deleted after the next file is complete on disk, and never when it is the
    file just written (a fixed name such as ``model.pt`` is replaced by the rename itself).
    """

    def __init__(self, dirname: str, filename: str | None = None, recipe: Mapping | None = None) -> None:
        self.dirname = dirname
        self.filename = filename
        self.recipe = recipe
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            return
        filename = self.filename or filename
        path = os.path.join(self.dirname, filename)
        bad = non_finite_entries(checkpoint)
        if bad:
            logger.error(
                f"not saving '{path}': {', '.join(bad)} hold NaN or infinite values. The previous file is kept."
            )
            return
        with atomic_path(path) as tmp:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        if self.recipe is not None:
            write_recipe(path, self.recipe)
        _fsync_folder(self.dirname)  # the rename itself reaches the disk before the older file goes
        for old in self.pending_removal:
            if old != filename:
                try:
                    os.remove(os.path.join(self.dirname, old))
                except FileNotFoundError:
                    pass
        self.pending_removal = []

    def remove(self, filename: str) -> None:
        filename = self.filename or filename
        if filename not in self.pending_removal:
            self.pending_removal.append(filename)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a system where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` for runs that take days: a crash or a bad step must not cost the saved state.

    Same arguments and file names as ``monai.handlers.CheckpointSaver``, with these differences:

    - every file is written to a hidden temporary file, flushed to disk and renamed, so a file under its final
      name is always complete;
    - a periodic checkpoint that a newer one supersedes (``n_saved``) is deleted only after the newer one is
      complete, so a kill mid-write leaves the previous one;
    - a checkpoint whose tensors hold NaN or infinite values (a diverged training) is not written, with an
      error in the log, so it can neither become the "best" model nor the state a resume starts from;
    - periodic checkpoints left by the run being resumed count towards ``n_saved`` (they do not pile up);
    - with ``recipe`` (the settings the network is trained for), the best model's file gets its recipe
      beside it (:func:`write_recipe`) each time it is saved;
    - it is itself a state to save and load: ``state_dict()`` holds the best key metric, its epoch and the best
      file, so that a resumed training compares new validations with the best one before the interruption
      (put it in the training state's ``save_dict`` and the resume ``CheckpointLoader``'s ``load_dict``).
    """

    def __init__(self, save_dir: str, save_dict: dict, recipe: Mapping | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        os.makedirs(save_dir, exist_ok=True)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                best = checkpoint is self._key_metric_checkpoint
                checkpoint.save_handler = _AtomicDiskSaver(
                    save_dir, checkpoint.save_handler.filename, recipe=recipe if best else None
                )
        self._engine = None
        self._adopted = False

    def attach(self, engine) -> None:
        super().attach(engine)
        self._engine = engine

    def interval_completed(self, engine) -> None:
        if not self._adopted:
            self._adopt_earlier_checkpoints(engine)
        super().interval_completed(engine)

    def _adopt_earlier_checkpoints(self, engine) -> None:
        """Count the periodic checkpoints of the run being resumed towards ``n_saved``."""
        self._adopted = True
        checkpoint = self._interval_checkpoint
        if checkpoint is None or checkpoint.n_saved is None:
            return
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        name = re.compile(
            re.escape(checkpoint.filename_prefix + ("_" if checkpoint.filename_prefix else ""))
            + r"checkpoint_"
            + ("epoch" if self.epoch_level else "iteration")
            + r"=(\d+)\.pt"
        )
        known = {item.filename for item in checkpoint._saved}
        earlier = []
        for file in os.listdir(self.save_dir):
            match = name.fullmatch(file)
            if match and int(match[1]) < step and file not in known:
                earlier.append(Checkpoint.Item(int(match[1]), file))
        earlier.sort(key=lambda item: item.priority)
        keep = max(checkpoint.n_saved - 1 - len(checkpoint._saved), 0)
        kept = earlier[len(earlier) - keep :] if keep else []
        checkpoint._saved = sorted(checkpoint._saved + kept, key=lambda item: item.priority)
        for item in earlier[: len(earlier) - len(kept)]:
            checkpoint.save_handler.remove(item.filename)

    def state_dict(self) -> dict:
        """The best key metric so far, its epoch and the file holding it."""
        state: dict[str, Any] = {}
        if self._key_metric_checkpoint is not None:
            state["key_metric_saved"] = [(float(p), str(f)) for p, f in self._key_metric_checkpoint._saved]
        engine_state = getattr(self._engine, "state", None)
        if engine_state is not None and getattr(engine_state, "best_metric_epoch", -1) != -1:
            state["best_metric"] = float(engine_state.best_metric)
            state["best_metric_epoch"] = int(engine_state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the best key metric (and the engine's ``best_metric`` / ``best_metric_epoch``)."""
        if self._key_metric_checkpoint is not None and "key_metric_saved" in state_dict:
            self._key_metric_checkpoint._saved = [Checkpoint.Item(p, f) for p, f in state_dict["key_metric_saved"]]
        if self._engine is not None and "best_metric" in state_dict:
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


def trained_weights(path: str, network: torch.nn.Module | None = None) -> str:
    """``path`` if it holds weights that fit ``network``, for a ``CheckpointLoader``; otherwise an error saying why.

    Inference and evaluation load the segmentor's weights (a flat state dict) from ``models/model.pt``, which
    training writes. A missing file, or weights trained with other ``features`` or ``modalities`` (the demo
    overlay trains a narrower network), fail here with what to do, instead of as a bare ``torch.load`` or
    ``load_state_dict`` error later.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no trained weights at '{path}'. Train first (python -m monai.bundle run training --config_file "
            "configs/train.json --dataset_dir <data>), which writes models/model.pt, or point --ckpt_path at a "
            "model.pt (a state dict of network_def, trained with the same `features` and `modalities`)."
        )
    if network is None:
        return path
    state = _load_state(path)
    bad = non_finite_entries(state)
    if bad:
        raise ValueError(
            f"the weights in '{path}' hold NaN or infinite values ({', '.join(bad)}): they come from a training that "
            "diverged and would segment every voxel as background. Use the model.pt of an earlier run, or train "
            "again (check the inputs, lower `learning_rate`)."
        )
    expected = network.state_dict()
    if set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()):
        return path
    try:
        saved = segmentor_settings(state)
        hint = f" It holds a segmentor with features {saved['features']} and {saved['in_channels']} input channel(s)."
    except ValueError:
        hint = ""
    raise ValueError(
        f"the weights in '{path}' do not fit network_def.{hint} Run with the settings it was trained with, "
        'e.g. --features "[16, 32, 64, 128]" for a model trained with configs/demo.json, and the same '
        "`modalities` and `regions`."
    )


def latest_training_state(state_dir: str) -> str:
    """The newest full training state in ``state_dir`` that loads, for ``--resume true``.

    Training saves the state every ``val_interval`` epochs (``checkpoint_epoch=N.pt``) and at the end or on
    an error (``training_state.pt``); a run killed from outside (a scheduler's time limit, a lost node)
    leaves only the periodic file, so the newest of them is what to resume from. A file that does not load
    (cut short by a crash, or damaged since) or holds NaN or infinite values is skipped with a warning naming
    it, and the next newest is tried.
    """
    candidates = glob.glob(os.path.join(state_dir, "checkpoint_epoch=*.pt"))
    candidates += glob.glob(os.path.join(state_dir, "training_state.pt"))
    if not candidates:
        raise FileNotFoundError(
            f"nothing to resume from: no training_state.pt or checkpoint_epoch=*.pt in '{state_dir}'. Drop "
            "--resume, or point --state_dir at the checkpoints folder of the run to continue."
        )
    skipped = []
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            state = _load(path, "")
        except ValueError as error:
            cause = error.__cause__ or error
            why = f"{os.path.getsize(path)} bytes, {type(cause).__name__}: {cause}".rstrip(": ")
            skipped.append(f"'{path}' (does not load: {why})")
            logger.warning(f"not resuming from '{path}': it does not load ({why}); trying an older state.")
            continue
        bad = non_finite_entries(state)
        if bad:
            skipped.append(f"'{path}' (NaN or infinite values in {', '.join(bad)})")
            logger.warning(
                f"not resuming from '{path}': {', '.join(bad)} hold NaN or infinite values; trying an older state."
            )
            continue
        return path
    raise ValueError(
        f"nothing to resume from in '{state_dir}': no training state there loads: {'; '.join(skipped)}. Drop --resume "
        "to start over."
    )


def _load(path: str, what_to_do: str) -> Any:
    """``torch.load(path)`` of weights only, on the CPU; a file that does not load raises an error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ValueError(
            f"cannot load '{path}' ({size} bytes): {type(error).__name__}: {error}. The file is damaged (e.g. cut "
            f"short by a crash or an interrupted copy) or is not a PyTorch checkpoint. {what_to_do}".rstrip()
        ) from error
