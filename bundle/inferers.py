"""Inference pieces MONAI lacks: slice inference over an input that may hold no slice at all, and the segmentor
run by onnxruntime."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SliceInferer

__all__ = ["ForegroundSliceInferer", "OnnxRuntimeNetwork"]


class ForegroundSliceInferer(SliceInferer):
    """``SliceInferer`` for input cropped to its foreground (``bundle.transforms.CropForegroundToGridd``).

    A case with no foreground at all is cropped to an empty image: its prediction is an empty array of
    ``out_channels`` maps, with no network call, which ``Invertd`` pads back into an all-background map.

    Args:
        out_channels: channels of the network's output (one per region).
        args, kwargs: as ``monai.inferers.SliceInferer``.
    """

    def __init__(self, out_channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_channels = int(out_channels)

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if 0 in inputs.shape[2:]:
            return torch.zeros((inputs.shape[0], self.out_channels, *inputs.shape[2:]), device=inputs.device)
        return super().__call__(inputs, network, *args, **kwargs)


class OnnxRuntimeNetwork(torch.nn.Module):
    """The segmentor exported to ONNX (``models/model.onnx``), run by onnxruntime, called like the PyTorch module.

    The inference config swaps it in for ``network`` with ``backend: onnxruntime``: pre- and post-processing and
    the inferer stay the same; only the network's forward pass runs in onnxruntime (its CPU provider, or CUDA
    where onnxruntime-gpu and a GPU are present). The model needs dynamic batch, height and width axes, as
    the README's ``onnx_export`` command writes it.

    With ``weights`` (the config's ``ckpt_path``), the export is checked to come from those weights
    (:func:`bundle.provenance.check_origin`: its origin record, or else its output against ``reference``, the
    ``network_def`` they load into), so a stale ``model.onnx`` is refused instead of segmenting with another
    model.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime intra-op threads; ``None``: ``torch.get_num_threads()``.
        weights: the ``model.pt`` the export must come from; ``None``: not checked.
        reference: a network the weights load into, to compare outputs when the export has no origin record.
    """

    def __init__(
        self,
        path: str,
        threads: int | None = None,
        weights: str | None = None,
        reference: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        import os

        from monai.utils import optional_import

        ort, has_ort = optional_import("onnxruntime")
        if not has_ort:
            raise ImportError("backend 'onnxruntime' needs onnxruntime: pip install onnxruntime (or the 'onnx' extra).")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no ONNX model at '{path}': export one with `python -m monai.bundle onnx_export network_def "
                "--filepath models/model.onnx ...` (README, 'Export'), or set --onnx_path."
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        if not torch.cuda.is_available():
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        if weights is not None:
            from .provenance import check_origin

            channels = self.session.get_inputs()[0].shape[1]
            check_origin(path, weights, self.forward, reference, channels if isinstance(channels, int) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.as_tensor(out, device=x.device)
