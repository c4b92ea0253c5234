"""Where trained weights and training states are found: the segmentor for inference and evaluation, the
newest full training state for ``--resume``. Both are called from the configs (a ``CheckpointLoader``'s
``load_path``) and fail with what to do instead of a bare ``torch.load`` error.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping

import torch

__all__ = ["trained_weights", "latest_training_state"]


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
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a {"model": state dict} checkpoint, which CheckpointLoader also accepts
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict of network_def.")
    expected = network.state_dict()
    if set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()):
        return path
    hint = ""
    convs = sorted((k for k in state if _ENCODER_CONV.fullmatch(k)), key=_natural)
    if convs:  # a SegANSegmentor: its encoder convolutions tell the widths and input channels it was made with
        widths = [int(state[k].shape[0]) for k in convs]
        hint = f" It holds a segmentor with features {widths} and {int(state[convs[0]].shape[1])} input channel(s)."
    raise ValueError(
        f"the weights in '{path}' do not fit network_def.{hint} Run with the settings it was trained with, "
        "e.g. --features \"[16, 32, 64, 128]\" for a model trained with configs/demo.json, and the same "
        "`modalities` and `regions`."
    )


_ENCODER_CONV = re.compile(r"encoder\.\d+\.conv\.weight")


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


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
