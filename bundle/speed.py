"""Speed options that do not change what is computed: memory layout, compilation, cuDNN autotuning, the allocator.

The configs apply them through :func:`place_network` (``"network": "$@segan.speed.place_network(...)"``),
:func:`set_cudnn_benchmark` and :func:`reuse_memory`; mixed precision is the engines' ``amp`` with ``amp_kwargs``, inference
``sw_batch_size`` the inferer's. Figures for each: ``docs/performance.md``.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from monai.utils import str2bool

__all__ = ["place_network", "reuse_memory", "set_cudnn_benchmark"]

#: glibc ``mallopt`` parameters (``malloc.h``) and the values :func:`reuse_memory` sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_REUSE = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**30, _M_TOP_PAD: 64 * 2**20}


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


def reuse_memory(enabled: bool | str = True) -> bool:
    """Let the C allocator keep freed blocks for reuse instead of returning them to the system.

    A CPU forward pass allocates and frees the same large activations for every slice batch. By default glibc
    serves blocks above a threshold (128 KB, rising with use) with ``mmap`` and unmaps them when freed, so
    every batch pays fresh page faults: on a 240x240x155 case at paper widths about 700,000 faults, 2 s of
    system time in 14 s of CPU time on one thread (``docs/performance.md``). This serves every block from the
    heap (no ``mmap``: the decoder's concatenated activations, 56 MB a batch of four 144x192 slices, are above
    the largest ``mmap`` threshold glibc allows, 32 MB) and keeps up to 1 GB of freed heap before trimming it;
    the computation is unchanged. For the process's lifetime: meant for inference processes (``initialize`` of
    the inference and evaluation configs). Linux with glibc only (elsewhere a no-op); set before the first large
    tensor. Returns whether it was applied.
    """
    enabled = str2bool(enabled) if isinstance(enabled, str) else bool(enabled)
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _REUSE.items())
