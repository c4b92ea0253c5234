"""Inference pieces MONAI lacks: slice inference over an input that may hold no slice at all, and the segmentor
run by onnxruntime."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SliceInferer

from .transforms import view_order, widen_to_grid

__all__ = ["ForegroundSliceInferer", "OnnxRuntimeNetwork"]


class ForegroundSliceInferer(SliceInferer):
    """``SliceInferer`` for input cropped to its foreground (``bundle.transforms.CropForegroundToGridd``).

    A case with no foreground at all is cropped to an empty image: its prediction is an empty array of
    ``out_channels`` maps, with no network call, which ``Invertd`` pads back into an all-background map.

    Whole slices (``roi_size`` covering the plane, ``[-1, -1]`` in the configs) take a direct path: the slices
    copied once into one batch-major array in the network's memory format, then batches of ``sw_batch_size``
    of them (views, no copies) through the network under ``torch.inference_mode``, written into one
    preallocated output. ``SliceInferer`` would run the same batches through MONAI's sliding window (a window
    per slice, gathered per batch, an importance map of ones, a count map, a division by 1), so the result is
    bit-identical; the path only skips that bookkeeping and its per-batch temporaries. Any
    other setting (a smaller ``roi_size``, a blend mode other than ``constant``, extra network arguments) goes
    through ``SliceInferer``.

    ``slice_margin`` (the configs' key of that name, where ``crop_foreground`` and ``crop_slices`` are on) narrows
    each whole slice to its own foreground: the box of its nonzero voxels (any channel), widened by ``slice_margin``
    and outwards to multiples of ``slice_grid`` (the segmentor's ``2 ** levels``), so that it stays on the
    network's down-sampling grid as :class:`bundle.transforms.CropForegroundToGridd` does for the volume. Slices
    whose boxes have the same size are batched together, the largest first; outside its box, and in a slice with
    no foreground, a slice's output is ``background_logit`` (a sigmoid of 0 in float32). A brain's slices narrow
    towards its top and bottom, so this skips part of the volume crop's pixels; a small box gives the network less
    context than the volume crop did, which is why the configs' margin (32) is wider than ``foreground_margin``
    (``docs/performance.md`` has both figures). ``None`` (the default) keeps whole slices.

    Views: a volume stays in its stored frame and ``slice_axis`` (0, 1 or 2, :func:`bundle.transforms.view_order`)
    says which stored axis the network slices along; the volume is permuted to that view for the network and its
    output permuted back. A multi-view ensemble (:class:`bundle.ensemble.EnsembleNetwork` whose members were
    trained along different axes) runs each view's members along their own axis and averages all members'
    probabilities; the output is the logit (log, for multiclass models) of that mean, as for any ensemble.

    Args:
        out_channels: channels of the network's output (one per region).
        slice_axis: the stored axis to slice along; 2 (the default) is the axial one of BraTS-layout volumes.
        slice_margin: voxels of context kept around each slice's foreground (whole slices only); ``None``: none
            cropped.
        slice_grid: the multiple each slice's box is aligned to and sized in.
        background_logit: the output outside a slice's box.
        args, kwargs: as ``monai.inferers.SliceInferer``.
    """

    def __init__(
        self,
        out_channels: int,
        *args: Any,
        slice_axis: int = 2,
        slice_margin: int | None = None,
        slice_grid: int = 16,
        background_logit: float = -1e4,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.out_channels = int(out_channels)
        self.slice_axis = view_order(slice_axis)[-1]
        self.slice_margin = None if slice_margin is None else int(slice_margin)
        self.slice_grid = int(slice_grid)
        self.background_logit = float(background_logit)
        if self.slice_margin is not None and (self.slice_margin < 0 or self.slice_grid < 1):
            raise ValueError(
                f"slice_margin must be >= 0 and slice_grid >= 1, got {slice_margin} and {slice_grid} "
                "(slice_margin and the segmentor's 2 ** levels in the configs)."
            )

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if 0 in inputs.shape[2:]:
            return torch.zeros((inputs.shape[0], self.out_channels, *inputs.shape[2:]), device=inputs.device)
        views = getattr(network, "views", None)
        groups = views() if callable(views) else [(self.slice_axis, network, 1)]
        if inputs.ndim != 5:  # a 2D image (ISIC): one slice, no view to choose
            return self._along(inputs, network, 2, *args, **kwargs)
        if len(groups) == 1:
            return self._along(inputs, groups[0][1], groups[0][0], *args, **kwargs)
        from .ensemble import logit_of_mean

        multiclass = bool(getattr(network, "multiclass", False))
        return logit_of_mean(
            [(self._along(inputs, members, axis, *args, **kwargs), size) for axis, members, size in groups], multiclass
        )

    def _along(self, inputs: torch.Tensor, network, slice_axis: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The network's output for ``inputs``, sliced along the stored axis ``slice_axis``."""
        moved = inputs.ndim == 5 and slice_axis != 2
        if moved:
            from monai.utils import convert_to_dst_type

            plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
            output = self._slices(plain.movedim(2 + slice_axis, -1), network, *args, **kwargs)
            return convert_to_dst_type(output.movedim(-1, 2 + slice_axis), inputs, device=inputs.device)[0]
        return self._slices(inputs, network, *args, **kwargs)

    def _slices(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._whole_slices(inputs) and not args and not kwargs:
            return self._slice_batches(inputs, network)
        return super().__call__(inputs, network, *args, **kwargs)

    def _whole_slices(self, inputs: torch.Tensor) -> bool:
        """Whether every window is one whole axial slice, blended with constant weights (the direct path)."""
        from monai.utils import BlendMode, fall_back_tuple

        if self.spatial_dim != 2 or inputs.ndim != 5 or len(self.orig_roi_size) != 2:
            return False
        plane = tuple(inputs.shape[2:4])
        roi = fall_back_tuple(self.orig_roi_size, plane)
        same_device = self.sw_device is None or torch.device(self.sw_device) == inputs.device
        same_device = same_device and (self.device is None or torch.device(self.device) == inputs.device)
        options = (self.buffer_steps, self.with_coord, self.progress)
        return (
            tuple(roi) == plane and self.mode == BlendMode.CONSTANT and same_device and options == (None, False, False)
        )

    def _slice_batches(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """The network over batches of whole slices, grouped as MONAI's sliding window groups its windows, or over
        each slice's foreground box (``slice_margin``), batched by box size."""
        from monai.utils import convert_to_dst_type

        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        batch, channels, height, width, depth = plain.shape
        # every slice of every case, case-major as sliding_window_inference enumerates its windows, copied once
        # into the layout the network's weights use (channels-last: (N, H, W, C) memory, NCHW shape)
        memory_format = _memory_format(network)
        if memory_format == torch.channels_last:
            slices = plain.permute(0, 4, 2, 3, 1).reshape(batch * depth, height, width, channels).permute(0, 3, 1, 2)
        else:
            slices = plain.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, height, width)
        total = batch * depth
        if self.slice_margin is None:  # consecutive whole slices: views of ``slices``, no copies
            runs = [
                (range(start, min(start + self.sw_batch_size, total)), None)
                for start in range(0, total, self.sw_batch_size)
            ]
        else:
            runs = self._box_runs(slices)
        output = None
        with torch.inference_mode():
            for indices, boxes in runs:
                if boxes is None:
                    part = slices[indices[0] : indices[-1] + 1]
                else:
                    part = torch.stack([slices[n, :, y0:y1, x0:x1] for n, (y0, y1, x0, x1) in zip(indices, boxes)])
                    part = part.contiguous(memory_format=memory_format)
                pred = network(part)
                if not isinstance(pred, torch.Tensor) or tuple(pred.shape[2:]) != tuple(part.shape[2:]):
                    return super().__call__(inputs, network)  # outputs SliceInferer restacks itself
                if output is None:
                    output = self._output(plain, pred.shape[1])
                if boxes is None:
                    start, stop = indices[0], indices[-1] + 1
                    for b in range(start // depth, (stop - 1) // depth + 1):  # a batch may span two cases
                        first, last = max(start, b * depth), min(stop, (b + 1) * depth)
                        part = pred[first - start : last - start].permute(1, 2, 3, 0)
                        output[b, ..., first - b * depth : last - b * depth].copy_(part)
                else:
                    for k, (n, (y0, y1, x0, x1)) in enumerate(zip(indices, boxes)):
                        output[n // depth, :, y0:y1, x0:x1, n % depth].copy_(pred[k])
        if output is None:  # no slice with foreground
            output = self._output(plain, self.out_channels)
        return convert_to_dst_type(output, inputs, device=inputs.device)[0]

    def _output(self, plain: torch.Tensor, channels: int) -> torch.Tensor:
        """The (B, channels, H, W, D) output, filled with ``background_logit`` where slices are cropped."""
        batch, _, height, width, depth = plain.shape
        with torch.inference_mode(False):  # a normal tensor, free to be changed in place later
            output = torch.empty((batch, channels, height, width, depth), dtype=plain.dtype, device=plain.device)
            if self.slice_margin is not None:
                output.fill_(self.background_logit)
        return output

    def _box_runs(self, slices: torch.Tensor) -> list:
        """Batches of at most ``sw_batch_size`` slices whose boxes have the same size: (slice indices, boxes)."""
        height, width = slices.shape[2:]
        grid, margin = self.slice_grid, self.slice_margin
        if height % grid or width % grid:  # off the grid the boxes could not be sized in its multiples
            grid, margin = 1, max(height, width)
        foreground = slices.ne(0).any(1)  # (N, H, W)
        rows, columns = foreground.any(2), foreground.any(1)
        groups: dict = {}
        for n in range(slices.shape[0]):
            ys, xs = torch.nonzero(rows[n]).flatten(), torch.nonzero(columns[n]).flatten()
            if not len(ys):
                continue  # no foreground: background, no network call
            start = [max(int(ys[0]) - margin, 0), max(int(xs[0]) - margin, 0)]
            end = [min(int(ys[-1]) + 1 + margin, height), min(int(xs[-1]) + 1 + margin, width)]
            (top, left), (bottom, right) = (v.tolist() for v in widen_to_grid(start, end, grid, (height, width)))
            groups.setdefault((bottom - top, right - left), []).append((n, (top, bottom, left, right)))
        runs = []  # the largest boxes first: later, smaller batches reuse the memory their activations freed
        for _, members in sorted(groups.items(), key=lambda item: -item[0][0] * item[0][1]):
            for start in range(0, len(members), self.sw_batch_size):
                chunk = members[start : start + self.sw_batch_size]
                runs.append(([n for n, _ in chunk], [box for _, box in chunk]))
        return runs


def _memory_format(network) -> torch.memory_format:
    """``torch.channels_last`` for a network whose convolution weights are stored so (``channels_last`` key)."""
    for parameter in getattr(network, "parameters", lambda: [])():
        if parameter.ndim == 4 and parameter.is_contiguous() != parameter.is_contiguous(
            memory_format=torch.channels_last
        ):
            return torch.contiguous_format if parameter.is_contiguous() else torch.channels_last
    return torch.contiguous_format


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
