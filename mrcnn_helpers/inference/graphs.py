"""The eval forward of a PyTorch model replayed from CUDA graphs, one per input shape.

A Mask R-CNN forward launches several hundred small kernels; at batch 1 launching them from
Python costs more than running them. The model's CUDA path has no host synchronization (Triton
RoIAlign and NMS, fixed-size detections: model/kernels), so the whole forward is captured once
per (batch, height, width, dtype) into a CUDA graph and replayed with one launch. Inputs are
copied into the graph's static buffer; outputs are cloned out of it, so a caller may keep them
across calls.

A graph holds the weights as they were when it was captured: when any parameter or buffer has
been written since (training between evaluations, a new checkpoint loaded in place), the shape is
captured again before its next replay. Capture cost is paid once per shape (and weight change)
and noted once on stderr. Where capture fails the shape runs eagerly, with a one-line note.
MRCNN_CUDA_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from mrcnn_helpers.model import kernels
from mrcnn_helpers.runtime import autocast

ENABLED = os.environ.get("MRCNN_CUDA_GRAPHS", "1") != "0"
WARMUP_CALLS = 2  # eager calls before capture (cuDNN algorithm choice, lazy allocations)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    outputs: dict
    weights: tuple


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `model` is replaced or written in place."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class GraphedForward:
    """`model(images)` in eval mode under no_grad and autocast(dtype), from CUDA graphs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, *, note=None):
        self.model = model
        self.dtype = dtype
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))
        self._captured: dict[tuple, _Captured] = {}
        self._eager: set[tuple] = set()
        self.capture_seconds: dict[tuple, float] = {}

    def _run(self, images: torch.Tensor) -> dict:
        with torch.no_grad(), autocast(images.device, self.dtype):
            return self.model(images)

    def __call__(self, images: torch.Tensor) -> dict:
        shape = (*images.shape, images.dtype)
        if shape in self._eager:
            return self._run(images)
        key = weights_key(self.model)
        entry = self._captured.get(shape)
        if entry is None or entry.weights != key:
            entry = self._capture(images, shape, key)
            if entry is None:
                return self._run(images)
        entry.static_input.copy_(images, non_blocking=True)
        entry.graph.replay()
        return {name: value.clone() for name, value in entry.outputs.items()}

    def _capture(self, images: torch.Tensor, shape: tuple, key: tuple) -> _Captured | None:
        start = time.perf_counter()
        static_input = images.clone()
        try:
            stream = torch.cuda.Stream(device=images.device)
            stream.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_CALLS):
                    self._run(static_input)
            torch.cuda.current_stream(images.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a deploy pipeline's decoder, a loader's pin-memory
            # thread) keep calling CUDA while this captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad(), \
                    torch.autocast(
                    "cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                    cache_enabled=False):
                outputs = self.model(static_input)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            self._eager.add(shape)
            self.note(f"note: CUDA graph capture failed for input {list(shape[:-1])} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "running it eagerly")
            return None
        torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - start
        first = shape not in self.capture_seconds
        self.capture_seconds[shape] = seconds
        if first:
            self.note(f"note: CUDA graph captured for input {list(shape[:-1])} in "
                      f"{seconds:.2f} s (once per input shape){kernels.first_use_note(seconds)}")
        entry = _Captured(graph, static_input, outputs, key)
        self._captured[shape] = entry
        return entry
