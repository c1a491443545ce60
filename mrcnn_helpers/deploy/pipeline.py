"""Streaming inference: decode -> batch -> infer -> draw -> encode, with FPS and latency.

Three stages overlap: a decoder thread reads frames, the calling thread batches, preprocesses
(resize_and_pad, exactly as training) and runs the model, and a writer thread maps detections back
to frame pixels (postprocess_detections: the same code evaluation scores), draws them
(visualize.draw_instances) and encodes. The model is anything with the eval interface of
mrcnn_helpers.model.MaskRCNN: the PyTorch model (fp32, or fp16 / bf16 autocast on a GPU), an
ONNX Runtime or a TensorRT backend (mrcnn_helpers.export).

Latency of a frame = from the moment it is decoded to the moment its annotated frame is written
(queueing included); inference latency = one model call on one batch.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.model.maskrcnn import place_model

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_END = object()


def percentiles(values, qs=(50, 90, 99)) -> dict:
    """{"p50": .., "p90": .., "p99": ..} of `values` (0.0 each when empty)."""
    if len(values) == 0:
        return {f"p{q}": 0.0 for q in qs}
    array = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(array, q)) for q in qs}


@dataclass
class DeployStats:
    """What a deploy run did and how fast: frames, wall time, latencies in milliseconds."""

    backend: str
    batch_size: int
    frames: int = 0
    detections: int = 0
    seconds: float = 0.0
    frame_latency_ms: list = field(default_factory=list, repr=False)
    infer_latency_ms: list = field(default_factory=list, repr=False)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"backend": self.backend, "batch_size": self.batch_size, "frames": self.frames,
                "detections": self.detections, "seconds": self.seconds, "fps": self.fps,
                "latency_ms": percentiles(self.frame_latency_ms),
                "infer_ms_per_batch": percentiles(self.infer_latency_ms)}

    def summary(self) -> str:
        lat, inf = percentiles(self.frame_latency_ms), percentiles(self.infer_latency_ms)
        return (f"{self.frames} frames in {self.seconds:.2f} s: {self.fps:.2f} FPS "
                f"({self.backend}, batch {self.batch_size}, {self.detections} detections)\n"
                f"frame latency ms  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
                f"p99 {lat['p99']:.1f}\n"
                f"inference ms/batch p50 {inf['p50']:.1f}  p90 {inf['p90']:.1f}  "
                f"p99 {inf['p99']:.1f}")


def backend_name(model) -> str:
    """"pytorch" for an nn.Module, else the backend's class (OnnxRuntimeModel, TensorRTModel)."""
    return "pytorch" if isinstance(model, torch.nn.Module) else type(model).__name__


def make_runner(model, *, precision: str = "fp32", device=None):
    """A function uint8 [B, 3, H, W] -> detection dict (CPU tensors) for the model.

    precision applies to PyTorch models (autocast on CUDA); exported backends run at the
    precision they were built with (fp32 for ONNX; the engine's data type for TensorRT).
    """
    if precision not in PRECISIONS:
        raise MrcnnError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    is_torch = isinstance(model, torch.nn.Module)
    if not is_torch:
        if precision != "fp32":
            raise MrcnnError(f"--precision {precision} applies to PyTorch models; an exported "
                             "model runs at the precision it was exported / built with")
        return model, torch.device("cpu")
    from mrcnn_helpers.predict import resolve_device

    device = resolve_device(model, device)
    place_model(model, device).eval()
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type != "cuda":
        raise MrcnnError(f"--precision {precision} needs a CUDA device (got {device})")

    def run(images):
        autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            out = model(images.to(device, non_blocking=True))
        return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    return run, device


class _Worker(threading.Thread):
    """A daemon thread that remembers the exception that ended it."""

    def __init__(self, target, name):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error = None

    def run(self):
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self.error = exc


def _put_while_alive(q: queue.Queue, item, worker: threading.Thread) -> None:
    """q.put(item), unless the consuming worker has died (then the item is dropped)."""
    while worker.is_alive():
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def run_deploy(model, spec, class_names, source, sink, *, batch_size: int | None = None,
               threshold: float = 0.5, include_mask: bool = True, precision: str = "fp32",
               device=None, max_frames: int | None = None, progress: bool = True,
               queue_size: int = 16) -> DeployStats:
    """Annotate every frame of `source` (deploy.io.open_source) into `sink` (open_sink).

    batch_size: frames per model call (default: an exported model's batch, else
    spec.eval_batch_size). Returns DeployStats (FPS, frame and inference latency percentiles).
    """
    from mrcnn_helpers.data import resize_and_pad
    from mrcnn_helpers.predict import postprocess_detections
    from mrcnn_helpers.visualize import draw_instances

    meta = getattr(model, "meta", None)
    if batch_size is None:
        batch_size = meta.batch_size if meta is not None else int(spec.eval_batch_size)
    batch_size = max(1, int(batch_size))
    image_size = tuple(int(v) for v in spec.data_config.image_size)
    include_mask = include_mask and bool(spec.maskrcnn_config.include_mask)
    names = list(class_names)
    if len(names) == spec.data_config.num_classes - 1:
        names = ["background"] + names
    run, _ = make_runner(model, precision=precision, device=device)
    stats = DeployStats(backend=backend_name(model) + ("" if precision == "fp32"
                                                       else f" {precision}"),
                        batch_size=batch_size)
    frames_in: queue.Queue = queue.Queue(maxsize=queue_size)
    frames_out: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()

    def decode():
        count = 0
        try:
            for frame in source:
                if stop.is_set() or (max_frames is not None and count >= max_frames):
                    break
                frames_in.put((frame, time.perf_counter()))
                count += 1
        finally:
            frames_in.put(_END)

    def encode():
        while True:
            item = frames_out.get()
            if item is _END:
                return
            frame, dets, index, scale, t0 = item
            out = postprocess_detections(dets, index, scale, frame.shape[:2], threshold,
                                         include_mask)
            drawn = draw_instances(frame, out["boxes"], out["scores"], out["classes"], names,
                                   masks=out["masks"])
            sink.write(np.asarray(drawn))
            stats.detections += len(out["scores"])
            stats.frame_latency_ms.append((time.perf_counter() - t0) * 1000.0)
            stats.frames += 1
            if progress and stats.frames % 50 == 0:
                print(f"deploy: {stats.frames} frames", file=sys.stderr)

    reader, writer = _Worker(decode, "mrcnn-decode"), _Worker(encode, "mrcnn-encode")
    start = time.perf_counter()
    reader.start()
    writer.start()
    try:
        done = False
        while not done:
            batch = []
            while len(batch) < batch_size:
                item = frames_in.get()
                if item is _END:
                    done = True
                    break
                batch.append(item)
            if not batch:
                break
            padded, scales = [], []
            for frame, _ in batch:
                tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
                p, s = resize_and_pad(tensor, image_size)
                padded.append(p)
                scales.append(s)
            t_infer = time.perf_counter()
            dets = run(torch.stack(padded))
            stats.infer_latency_ms.append((time.perf_counter() - t_infer) * 1000.0)
            for i, (frame, t0) in enumerate(batch):
                _put_while_alive(frames_out, (frame, dets, i, scales[i], t0), writer)
                if writer.error is not None:
                    raise writer.error
    finally:
        stop.set()
        # Drain so a reader blocked on a full queue sees `stop`; give up on a stalled stream.
        deadline = time.perf_counter() + 5.0
        while reader.is_alive() and time.perf_counter() < deadline:
            with contextlib.suppress(queue.Empty):
                frames_in.get(timeout=0.1)
        _put_while_alive(frames_out, _END, writer)
        writer.join()
        reader.join(timeout=1.0)
        sink.close()
        source.close()
    for worker in (reader, writer):
        if worker.error is not None:
            raise worker.error
    stats.seconds = time.perf_counter() - start
    return stats
