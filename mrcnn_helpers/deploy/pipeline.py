"""Streaming inference: decode -> batch -> infer -> draw -> encode, with FPS and latency.

Three stages overlap: a decoder thread reads frames, the calling thread batches, preprocesses
(resize_and_pad, exactly as training) and runs the model, and a writer thread maps detections back
to frame pixels (postprocess_detections: the same code evaluation scores), draws them
(visualize.draw_instances) and encodes. With a PyTorch model on a GPU the masks never leave it:
the inference thread composites them into the frame there (deploy.overlay) and the writer draws
only the box outlines and labels. The model is an inference.Predictor: the PyTorch model
(fp32, or fp16 / bf16 autocast on a GPU), an ONNX Runtime or a TensorRT backend.

Three times are reported per frame or batch, in milliseconds:
- latency: from the moment a frame is read to the moment its annotated frame is written; for a
  file source, read far ahead of the model, this includes the time it waits in the queue;
- service: from the moment the frame's batch starts (preprocessing) to the frame written, what
  a live source running below the pipeline's rate sees;
- inference: one model call on one batch.
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

from mrcnn_helpers.deploy.overlay import composite_masks
from mrcnn_helpers.inference.predictor import Predictor
from mrcnn_helpers.visualize import draw_boxes_and_labels, draw_instances

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
    service_latency_ms: list = field(default_factory=list, repr=False)
    infer_latency_ms: list = field(default_factory=list, repr=False)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"backend": self.backend, "batch_size": self.batch_size, "frames": self.frames,
                "detections": self.detections, "seconds": self.seconds, "fps": self.fps,
                "latency_ms": percentiles(self.frame_latency_ms),
                "service_ms": percentiles(self.service_latency_ms),
                "infer_ms_per_batch": percentiles(self.infer_latency_ms)}

    def summary(self) -> str:
        rows = [("read -> written ms", self.frame_latency_ms),
                ("batch start -> written ms", self.service_latency_ms),
                ("inference ms/batch", self.infer_latency_ms)]
        head = (f"{self.frames} frames in {self.seconds:.2f} s: {self.fps:.2f} FPS "
                f"({self.backend}, batch {self.batch_size}, {self.detections} detections)")
        lines = [head]
        for label, values in rows:
            q = percentiles(values)
            lines.append(f"{label:<26} p50 {q['p50']:.1f}  p90 {q['p90']:.1f}  p99 {q['p99']:.1f}")
        return "\n".join(lines)


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


def run_deploy(predictor: Predictor, source, sink, *, batch_size: int | None = None,
               threshold: float = 0.5, include_mask: bool = True, max_frames: int | None = None,
               progress: bool = True, queue_size: int = 16,
               draw_on_device: bool | None = None) -> DeployStats:
    """Annotate every frame of `source` (deploy.io.open_source) into `sink` (open_sink).

    batch_size: frames per model call (default: an exported model's fixed batch, else
    spec.eval_batch_size). draw_on_device: composite the masks where the model runs (None: for
    a PyTorch model on a GPU). Returns DeployStats (FPS, latency percentiles).
    """
    meta = getattr(predictor.model, "meta", None)
    if batch_size is None:
        batch_size = meta.batch_size if meta is not None else predictor.batch_size
    pipeline = _Pipeline(predictor, source, sink, batch_size=max(1, int(batch_size)),
                         threshold=threshold, include_mask=include_mask, max_frames=max_frames,
                         progress=progress, queue_size=queue_size,
                         draw_on_device=draw_on_device)
    return pipeline.run()


class _Pipeline:
    """The three stages of run_deploy and the queues between them."""

    def __init__(self, predictor, source, sink, *, batch_size, threshold, include_mask,
                 max_frames, progress, queue_size, draw_on_device=None):
        self.predictor, self.source, self.sink = predictor, source, sink
        self.batch_size, self.threshold, self.include_mask = batch_size, threshold, include_mask
        self.max_frames, self.progress = max_frames, progress
        backend = predictor.backend + ("" if predictor.precision == "fp32"
                                       else f" {predictor.precision}")
        self.stats = DeployStats(backend=backend, batch_size=batch_size)
        self.frames_in: queue.Queue = queue.Queue(maxsize=queue_size)
        self.frames_out: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stop = threading.Event()
        if draw_on_device is None:
            draw_on_device = predictor.device.type == "cuda"
        self.draw_on_device = bool(draw_on_device) and predictor.backend == "pytorch"

    def decode(self) -> None:
        """Reader thread: frames with the time they were read, then _END."""
        count = 0
        try:
            for name, frame in self.source:
                if self.stop.is_set() or (self.max_frames is not None
                                          and count >= self.max_frames):
                    break
                self.frames_in.put((name, frame, time.perf_counter()))
                count += 1
        finally:
            self.frames_in.put(_END)

    def encode(self) -> None:
        """Writer thread: draw each frame's detections, write it, count its latencies."""
        stats = self.stats
        while True:
            item = self.frames_out.get()
            if item is _END:
                return
            name, frame, out, t_read, t_batch = item
            if "drawn" in out:  # masks composited on the device already
                drawn = draw_boxes_and_labels(frame, out["boxes"], out["scores"],
                                              out["classes"], self.predictor.class_names,
                                              out["drawn"])
            else:
                drawn = draw_instances(frame, out["boxes"], out["scores"], out["classes"],
                                       self.predictor.class_names, masks=out["masks"])
            self.sink.write(name, np.asarray(drawn))
            now = time.perf_counter()
            stats.detections += len(out["scores"])
            stats.frame_latency_ms.append((now - t_read) * 1000.0)
            stats.service_latency_ms.append((now - t_batch) * 1000.0)
            stats.frames += 1
            if self.progress and stats.frames % 50 == 0:
                print(f"deploy: {stats.frames} frames", file=sys.stderr)

    def next_batch(self) -> list:
        """Up to batch_size frames from the reader; fewer (or none) at the end of the source."""
        batch = []
        while len(batch) < self.batch_size:
            item = self.frames_in.get()
            if item is _END:
                self.frames_in.put(_END)  # later calls see the end too
                break
            batch.append(item)
        return batch

    def infer(self, batch: list, writer: _Worker) -> None:
        """Preprocess, run and postprocess one batch; hand its frames to the writer."""
        predictor, stats = self.predictor, self.stats
        t_batch = time.perf_counter()
        on_device = self.draw_on_device and self.include_mask
        frames = [frame for _, frame, _ in batch]
        uploaded = None
        if on_device:
            # Frames go to the GPU once, as bytes: resized, padded and later drawn on there.
            uploaded = [torch.from_numpy(np.ascontiguousarray(f)).to(predictor.device)
                        for f in frames]
            try:
                images, scales, sizes = predictor.preprocess([u.permute(2, 0, 1)
                                                              for u in uploaded])
            except (RuntimeError, NotImplementedError):  # a resize the device lacks for uint8
                images, scales, sizes = predictor.preprocess(frames)
        else:
            images, scales, sizes = predictor.preprocess(frames)
        dets = predictor.forward(images)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)
        stats.infer_latency_ms.append((time.perf_counter() - t_batch) * 1000.0)
        outputs = predictor.postprocess(dets, scales, sizes, self.threshold, self.include_mask,
                                        masks_on_device=on_device)
        if on_device:
            batch = [(name, frame if out["masks"] is None else self.composite(up, out), t_read)
                     for (name, frame, t_read), up, out in zip(batch, uploaded, outputs,
                                                                 strict=True)]
        for (name, frame, t_read), out in zip(batch, outputs, strict=True):
            _put_while_alive(self.frames_out, (name, frame, out, t_read, t_batch), writer)
            if writer.error is not None:
                raise writer.error

    def composite(self, uploaded: torch.Tensor, out: dict) -> np.ndarray:
        """The frame (its copy on the device, `uploaded`) with out's masks blended in there;
        out["drawn"] set to the instances drawn (best first) and out["masks"] dropped (the writer
        draws the boxes and labels only). Frames without masks are left to draw_instances."""
        masks, out["masks"] = out["masks"], None
        order = torch.argsort(-out["scores"], stable=True)
        blended, drawn = composite_masks(uploaded, masks[order.to(masks.device)],
                                         out["classes"][order])
        out["drawn"] = order[drawn].numpy()
        return blended.cpu().numpy()

    def run(self) -> DeployStats:
        reader, writer = _Worker(self.decode, "mrcnn-decode"), _Worker(self.encode, "mrcnn-encode")
        start = time.perf_counter()
        reader.start()
        writer.start()
        try:
            while batch := self.next_batch():
                self.infer(batch, writer)
        finally:
            self.shutdown(reader, writer)
        for worker in (reader, writer):
            if worker.error is not None:
                raise worker.error
        self.stats.seconds = time.perf_counter() - start
        return self.stats

    def shutdown(self, reader: _Worker, writer: _Worker) -> None:
        self.stop.set()
        # Drain so a reader blocked on a full queue sees `stop`; give up on a stalled stream.
        deadline = time.perf_counter() + 5.0
        while reader.is_alive() and time.perf_counter() < deadline:
            with contextlib.suppress(queue.Empty):
                self.frames_in.get(timeout=0.1)
        _put_while_alive(self.frames_out, _END, writer)
        writer.join()
        reader.join(timeout=1.0)
        self.sink.close()
        self.source.close()
