"""Where trained weights and training states are found: the segmentor for inference and evaluation, the
newest full training state for ``--resume``. Both are called from the configs (a ``CheckpointLoader``'s
``load_path``) and fail with what to do instead of a bare ``torch.load`` error.

A flat state dict of :class:`bundle.networks.SegANSegmentor` also tells its own architecture: the encoder
convolutions give the widths (``features``) and the input channels, the head the output channels, and the
head's input width whether the U-net skips concatenate or add. The configs read ``features`` and ``skip`` from
``models/model.pt`` (:func:`trained_setting`), so a bundle serves and fine-tunes whatever it trained without
hand edits: MONAI Label and ``monai.bundle.load`` build ``network_def`` and load the weights themselves, and
take no command-line overrides.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["trained_weights", "trained_setting", "segmentor_settings", "latest_training_state"]


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


def _load_state(path: str) -> Mapping[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a {"model": state dict} checkpoint, which CheckpointLoader also accepts
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict of network_def.")
    return state


def trained_setting(
    path: str, name: str, default: Any, in_channels: int | None = None, out_channels: int | None = None
) -> Any:
    """The segmentor setting ``name`` (``"features"`` or ``"skip"``) saved in ``path``; ``default`` if there is no
    file, or it holds another network's weights.

    With ``in_channels`` / ``out_channels`` (the configs pass ``len(modalities)`` and ``len(regions)``), weights
    made for other channels are refused here with what to change, instead of being loaded in part: MONAI's
    non-strict loaders (``monai.bundle.load``) silently skip every tensor whose shape differs.
    """
    if name not in ("features", "skip"):
        raise ValueError(f"trained_setting reads 'features' or 'skip', got {name!r}.")
    if not path or not os.path.isfile(path):
        return default
    try:
        settings = segmentor_settings(_load_state(path))
    except ValueError:  # weights of another network_def (an overlay's): nothing to read, the config decides
        return default
    for key, expected, what in (("in_channels", in_channels, "modalities"), ("out_channels", out_channels, "regions")):
        if expected is not None and settings[key] != int(expected):
            raise ValueError(
                f"the segmentor in '{path}' has {settings[key]} {key.replace('_', ' ')} but the config gives "
                f"{int(expected)} (from `{what}`). Run with the `{what}` it was trained with, or point --ckpt_path "
                "at weights trained with these."
            )
    if settings[name] != default:
        logger.info(f"network_def {name}={settings[name]}, as saved in '{path}' (the config default is {default}).")
    return settings[name]


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
        "e.g. --features \"[16, 32, 64, 128]\" for a model trained with configs/demo.json, and the same "
        "`modalities` and `regions`."
    )



def latest_training_state(state_dir: str) -> str:
    """The newest full training state in ``state_dir``, for ``--resume true``.

    Training saves the state every ``val_interval`` epochs (``checkpoint_epoch=N.pt``) and at the end or on
    an error (``training_state.pt``); a run killed from outside (a scheduler's time limit, a lost node)
    leaves only the periodic file, so the newest of them is what to resume from.
    """
    candidates = glob.glob(os.path.join(state_dir, "checkpoint_epoch=*.pt"))
    candidates += glob.glob(os.path.join(state_dir, "training_state.pt"))
    if not candidates:
        raise FileNotFoundError(
            f"nothing to resume from: no training_state.pt or checkpoint_epoch=*.pt in '{state_dir}'. Drop "
            "--resume, or point --state_dir at the checkpoints folder of the run to continue."
        )
    return max(candidates, key=os.path.getmtime)

