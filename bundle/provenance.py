"""Derived files carry their origin: an exported network (ONNX, TorchScript) records the weights it came from.

``python -m monai.bundle onnx_export`` (or ``ckpt_export``) writes ``models/model.onnx`` from ``models/model.pt``;
training again replaces ``model.pt`` and leaves the export behind, stale. :func:`record_origin` writes
``<export>.origin.json`` beside the export, holding the sha256 of both files; :func:`check_origin` is called
where the export is loaded (``backend: onnxruntime``) and refuses an export whose recorded weights are not the
``model.pt`` in use, naming both files and the export command.

An export with no record (or one exported again since) is compared with the weights by what it computes: the
segmentor with the weights and the export run on one fixed input must agree (logits within ``1e-3``). If they
do, the record is written, so the next run only hashes; if they do not, the export is refused.

Record an export by hand: ``python -m bundle.provenance --export models/model.onnx --weights models/model.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable

import torch

from .files import write_atomic

__all__ = ["origin_path", "record_origin", "check_origin", "sha256"]

logger = logging.getLogger(__name__)

EXPORT_COMMAND = (
    "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt "
    "--config_file configs/inference.json ... (README, 'Export')"
)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def origin_path(export_path: str | os.PathLike) -> str:
    """Where the origin record of ``export_path`` lives: ``<export>.origin.json`` beside it."""
    return f"{os.fspath(export_path)}.origin.json"


def record_origin(export: str, weights: str) -> str:
    """Write ``<export>.origin.json``: the sha256 of ``export`` and of the ``weights`` it was exported from."""
    record = {
        "export": os.path.basename(export),
        "export_sha256": sha256(export),
        "weights": os.path.abspath(weights),
        "weights_sha256": sha256(weights),
    }
    path = origin_path(export)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    logger.info(f"recorded that '{export}' was exported from '{weights}' in '{path}'")
    return path


def _read_record(export: str) -> dict | None:
    path = origin_path(export)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        logger.warning(f"ignoring '{path}': it does not load")
        return None
    return record if isinstance(record, dict) else None


def check_origin(
    export: str,
    weights: str,
    run_export: Callable[[torch.Tensor], torch.Tensor] | None = None,
    network: torch.nn.Module | None = None,
    in_channels: int | None = None,
    size: int = 64,
) -> str:
    """Make sure ``export`` was exported from ``weights``; return how it was established.

    Returns ``"recorded"`` (the origin record names these weights), ``"computed"`` (no valid record: the export
    and ``network`` loaded with ``weights`` agree on a fixed input, and the record was written) or
    ``"unchecked"`` (no ``weights`` file, or nothing to compute with; a warning says so).

    Raises ``ValueError`` naming both files and the export command when the export came from other weights.
    """
    if not weights or not os.path.isfile(weights):
        logger.warning(f"cannot check that '{export}' matches any weights: no file at '{weights}'.")
        return "unchecked"
    record = _read_record(export)
    if record is not None and record.get("export_sha256") == sha256(export):
        if record.get("weights_sha256") == sha256(weights):
            return "recorded"
        raise ValueError(
            f"'{export}' was exported from other weights ('{record.get('weights')}', sha256 "
            f"{str(record.get('weights_sha256'))[:12]}...) than '{weights}' (sha256 {sha256(weights)[:12]}...): it is "
            f"stale and would segment with another model. Export it again from '{weights}': {EXPORT_COMMAND}; or "
            "point --ckpt_path at the weights it came from."
        )
    if run_export is None or network is None or not in_channels:
        logger.warning(f"cannot check that '{export}' was exported from '{weights}': no origin record beside it.")
        return "unchecked"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)
    network.eval()
    conv = next((m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    spatial_dims = conv.weight.dim() - 2 if conv is not None else 2
    if spatial_dims == 3:
        size = min(size, 32)  # a 3D network (Xue et al.'s critic and segmentor with spatial_dims 3): a smaller cube
    x = torch.randn((1, int(in_channels), *[size] * spatial_dims), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
        got = torch.as_tensor(run_export(x)).to(expected.dtype)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=1e-3):
        difference = (got - expected).abs().max().item() if got.shape == expected.shape else "shapes differ"
        raise ValueError(
            f"'{export}' does not compute what the weights in '{weights}' compute (largest logit difference "
            f"{difference} on a test input): it was exported from another model. Export it again from '{weights}': "
            f"{EXPORT_COMMAND}; or point --ckpt_path at the weights it came from."
        )
    try:
        record_origin(export, weights)
    except OSError as error:  # a read-only models folder: the check still held
        logger.warning(f"could not write '{origin_path(export)}' ({error}); the export matches '{weights}'.")
    return "computed"


if __name__ == "__main__":
    import fire

    fire.Fire(record_origin)
