"""Speed options that do not change what is computed: memory layout, compilation, cuDNN autotuning.

The configs apply them through :func:`place_network` (``"network": "$@segan.speed.place_network(...)"``) and
:func:`set_cudnn_benchmark`; mixed precision is the engines' ``amp`` with ``amp_kwargs``, inference
``sw_batch_size`` the inferer's. Figures for each: ``docs/performance.md``.
"""

from __future__ import annotations

import torch
from monai.utils import str2bool

__all__ = ["place_network", "set_cudnn_benchmark"]


def place_network(
    network: torch.nn.Module, device: str | torch.device, channels_last: bool | str = False, compile: bool | str = False
) -> torch.nn.Module:
    """``network`` moved to ``device``, optionally in channels-last layout and compiled; returns it.

    Args:
        network: the module (its parameters and ``state_dict`` keys stay as they are).
        device: where it runs.
        channels_last: store 4D weights as NHWC; convolutions then run in that layout (faster with cuDNN on
            tensor cores and with oneDNN on CPUs).
        compile: ``torch.compile`` the module in place (``Module.compile``, so checkpoints keep their keys):
            ``true`` for the default backend (inductor), or a backend name (e.g. ``"eager"``: traced only).
    """
    if str(channels_last).lower() in ("true", "false", "1", "0", "yes", "no"):
        channels_last = str2bool(str(channels_last))
    network = network.to(device=device, memory_format=torch.channels_last) if channels_last else network.to(device)
    if isinstance(compile, str) and compile.lower() in ("true", "false", "1", "0", "yes", "no"):
        compile = str2bool(compile)
    if compile is True:
        network.compile()
    elif compile:
        network.compile(backend=str(compile))
    return network


def set_cudnn_benchmark(enabled: bool | str) -> bool:
    """Let cuDNN time its convolution algorithms for each new input shape and keep the fastest.

    Pays off when shapes repeat (training slices of one size); called after ``set_determinism``, which turns
    it off. Returns the setting.
    """
    enabled = str2bool(enabled) if isinstance(enabled, str) else bool(enabled)
    torch.backends.cudnn.benchmark = enabled
    return enabled
