"""Streaming inference: decode -> batch -> infer -> draw -> encode, with FPS and latency.

The stages overlap: a decoder thread reads frames; the calling thread batches, preprocesses
(resize_and_pad, exactly as training), runs the model and maps detections back to frame pixels
(the rule of postprocess_detections, which evaluation scores); a pool of drawing threads draws
them (visualize.draw_instances) and a writer thread encodes the frames in order. With a PyTorch
model on a GPU the masks never leave it: the inference thread composites a whole batch of
frames there (deploy.overlay) and the drawing threads add only the box outlines and labels. The
model is an inference.Predictor: the PyTorch model (fp32, or fp16 / bf16 autocast on a GPU), an
ONNX Runtime or a TensorRT backend.

Three times are reported per frame or batch, in milliseconds:
- latency: from the moment a frame is read to the moment its annotated frame is written; for a
  file source, read far ahead of the model, this includes the time it waits in the queue;
- service: from the moment the frame's batch starts (preprocessing) to the frame written, what
  a live source running below the pipeline's rate sees;
- inference: one model call on one batch (with its preprocessing).
Where the time goes is kept per stage (DeployStats.stage_seconds, the summary's last line): the
busiest thread's stages bound the frame rate. A video sink with an encoder process
(video_writer.py) hands each frame over in "encode" and waits there only when the encoder is
behind.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from mrcnn_helpers.deploy.overlay import composite_batch, composite_masks
from mrcnn_helpers.inference.postprocess import postprocess_batch_on_device
from mrcnn_helpers.inference.predictor import Predictor
from mrcnn_helpers.visualize import draw_boxes_and_labels, draw_instances

_END = object()
# Which thread runs each stage (DeployStats.stage_seconds), in pipeline order.
STAGES = {"decode": "decoder", "preprocess": "inference", "model": "inference",
          "masks": "inference", "to_host": "inference", "draw": "drawing pool",
          "encode": "writer"}


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
    stage_seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0), repr=False)
    draw_threads: int = 1

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_time(self, stage: str, seconds: float) -> None:
        with self._lock:  # the drawing threads add concurrently
            self.stage_seconds[stage] += seconds

    def stage_ms_per_frame(self) -> dict:
        """Mean milliseconds per frame spent in each stage (the drawing pool's summed over its
        threads)."""
        return {k: 1000.0 * v / self.frames if self.frames else 0.0
                for k, v in self.stage_seconds.items()}

    def thread_ms_per_frame(self) -> dict:
        """Milliseconds per frame each thread is busy (a drawing thread's share of the pool's
        time): the busiest one caps the frame rate at 1000 / its milliseconds."""
        per_frame = self.stage_ms_per_frame()
        busy = dict.fromkeys(dict.fromkeys(STAGES.values()), 0.0)
        for stage, thread in STAGES.items():
            busy[thread] += per_frame[stage]
        busy["drawing pool"] /= max(1, self.draw_threads)
        return busy

    def busiest_thread(self) -> tuple[str, float]:
        """(thread, ms per frame) of the busiest thread: what to speed up first."""
        busy = self.thread_ms_per_frame()
        thread = max(busy, key=busy.get)
        return thread, busy[thread]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"backend": self.backend, "batch_size": self.batch_size, "frames": self.frames,
                "detections": self.detections, "seconds": self.seconds, "fps": self.fps,
                "latency_ms": percentiles(self.frame_latency_ms),
                "service_ms": percentiles(self.service_latency_ms),
                "infer_ms_per_batch": percentiles(self.infer_latency_ms),
                "stage_ms_per_frame": self.stage_ms_per_frame(),
                "thread_ms_per_frame": self.thread_ms_per_frame(),
                "draw_threads": self.draw_threads}

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
        per_frame = self.stage_ms_per_frame()
        lines.append("ms per frame by stage: " + ", ".join(
            f"{k} {v:.2f}" for k, v in per_frame.items())
            + f" (threads: decoder; inference; {self.draw_threads} drawing; writer)")
        thread, ms = self.busiest_thread()
        if ms > 0:
            lines.append(f"busiest thread: {thread}, {ms:.2f} ms per frame (at most "
                         f"{1000.0 / ms:.0f} FPS from it)")
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
               draw_on_device: bool | None = None,
               draw_threads: int | None = None) -> DeployStats:
    """Annotate every frame of `source` (deploy.io.open_source) into `sink` (open_sink).

    batch_size: frames per model call (default: an exported model's fixed batch, else
    spec.eval_batch_size). draw_on_device: composite the masks where the model runs (None: for
    a PyTorch model on a GPU). draw_threads: threads drawing boxes and labels (None:
    draw_threads_for this machine). Returns DeployStats (FPS, latency percentiles, time by stage).
    """
    meta = getattr(predictor.model, "meta", None)
    if batch_size is None:
        batch_size = meta.batch_size if meta is not None else predictor.batch_size
    pipeline = _Pipeline(predictor, source, sink, batch_size=max(1, int(batch_size)),
                         threshold=threshold, include_mask=include_mask, max_frames=max_frames,
                         progress=progress, queue_size=queue_size,
                         draw_on_device=draw_on_device, draw_threads=draw_threads)
    return pipeline.run()


def draw_threads_for(cpus: int | None = None, *, encodes: bool = False) -> int:
    """Drawing threads for this machine: 2 where the cores allow (drawing outlines and labels
    holds the GIL for much of its ~1-3 ms per frame, so more threads mostly wait for it: on the
    H200 machine 4 made 57 FPS where 2 made 69 at 100 detections per frame), 1 on a machine of
    fewer than 4 cores. encodes: the threads also encode the frames (a sink whose `prepare`
    encodes, deploy.io.VideoSink for an .avi: ~2.5 ms of JPEG per frame without the GIL), then
    4 where there are 8 cores or more."""
    cpus = cpus or os.cpu_count() or 1
    if encodes and cpus >= 8:
        return 4
    return 2 if cpus >= 4 else 1


class _Pipeline:
    """The stages of run_deploy and the queues between them."""

    def __init__(self, predictor, source, sink, *, batch_size, threshold, include_mask,
                 max_frames, progress, queue_size, draw_on_device=None, draw_threads=None):
        self.predictor, self.source, self.sink = predictor, source, sink
        self.batch_size, self.threshold, self.include_mask = batch_size, threshold, include_mask
        self.max_frames, self.progress = max_frames, progress
        backend = predictor.backend + ("" if predictor.precision == "fp32"
                                       else f" {predictor.precision}")
        encodes = bool(getattr(sink, "jpeg_frames", False))
        self.stats = DeployStats(backend=backend, batch_size=batch_size, draw_threads=max(
            1, int(draw_threads or draw_threads_for(encodes=encodes))))
        self.frames_in: queue.Queue = queue.Queue(maxsize=queue_size)
        self.frames_out: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stop = threading.Event()
        if draw_on_device is None:
            draw_on_device = predictor.device.type == "cuda"
        self.draw_on_device = bool(draw_on_device) and predictor.backend == "pytorch"
        self.pool = None
        # A sink that converts frames for its encoder lets the drawing threads do that part.
        self.prepare = getattr(sink, "prepare", None)

    def decode(self) -> None:
        """Reader thread: frames with the time they were read, then _END."""
        count = 0
        frames = iter(self.source)
        try:
            while not self.stop.is_set() and (self.max_frames is None
                                              or count < self.max_frames):
                t0 = time.perf_counter()
                item = next(frames, None)
                if item is None:
                    break
                now = time.perf_counter()
                self.stats.add_time("decode", now - t0)
                self.frames_in.put((item[0], item[1], now))
                count += 1
        finally:
            self.frames_in.put(_END)

    def draw(self, frame: np.ndarray, out: dict) -> np.ndarray:
        """One frame with its detections drawn (a drawing thread), prepared for the sink."""
        t0 = time.perf_counter()
        if "drawn" in out:  # masks composited on the device already
            drawn = draw_boxes_and_labels(frame, out["boxes"], out["scores"], out["classes"],
                                          self.predictor.class_names, out["drawn"])
        else:
            drawn = draw_instances(frame, out["boxes"], out["scores"], out["classes"],
                                   self.predictor.class_names, masks=out["masks"])
        drawn = np.asarray(drawn)
        if self.prepare is not None:
            drawn = self.prepare(drawn)
        self.stats.add_time("draw", time.perf_counter() - t0)
        return drawn

    def encode(self) -> None:
        """Writer thread: write the drawn frames in order, count their latencies."""
        stats = self.stats
        while True:
            item = self.frames_out.get()
            if item is _END:
                return
            name, drawing, detections, t_read, t_batch = item
            frame = drawing.result()
            t0 = time.perf_counter()
            if self.prepare is not None:
                self.sink.write_prepared(name, frame)
            else:
                self.sink.write(name, frame)
            now = time.perf_counter()
            stats.add_time("encode", now - t0)
            stats.detections += detections
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

    def preprocess(self, frames: list, on_device: bool):
        """(images, scales, sizes, the frames on the device or None). On the device path the
        frames go to the GPU once, as bytes: resized, padded and later drawn on there."""
        predictor = self.predictor
        if not on_device:
            return (*predictor.preprocess(frames), None)
        uploaded = [torch.from_numpy(np.ascontiguousarray(f)).to(predictor.device,
                                                                 non_blocking=True)
                    for f in frames]
        try:
            return (*predictor.preprocess([u.permute(2, 0, 1) for u in uploaded]), uploaded)
        except (RuntimeError, NotImplementedError):  # a resize the device lacks for uint8
            return (*predictor.preprocess(frames), uploaded)

    def infer(self, batch: list, writer: _Worker) -> None:
        """Preprocess, run and postprocess one batch; hand its frames to the drawing pool and
        the writer."""
        predictor, stats = self.predictor, self.stats
        sync = (torch.cuda.synchronize if predictor.device.type == "cuda"
                else lambda device: None)
        t_batch = time.perf_counter()
        on_device = self.draw_on_device and self.include_mask
        frames = [frame for _, frame, _ in batch]
        images, scales, sizes, uploaded = self.preprocess(frames, on_device)
        sync(predictor.device)
        t_pre = time.perf_counter()
        dets = predictor.forward(images)
        sync(predictor.device)
        t_model = time.perf_counter()
        stats.infer_latency_ms.append((t_model - t_batch) * 1000.0)
        t_host = None
        if on_device and len(set(sizes)) == 1:
            composited = self.composite_on_device(uploaded, dets, scales, sizes[0])
            sync(predictor.device)
            t_host = time.perf_counter()
            frames, outputs = self.to_host(*composited)
        else:
            outputs = predictor.postprocess(dets, scales, sizes, self.threshold,
                                            self.include_mask, masks_on_device=on_device)
            if on_device:
                frames = [frame if out["masks"] is None else self.composite(up, out)
                          for frame, up, out in zip(frames, uploaded, outputs, strict=True)]
        t_done = time.perf_counter()
        stats.add_time("preprocess", t_pre - t_batch)
        stats.add_time("model", t_model - t_pre)
        stats.add_time("masks", (t_host or t_done) - t_model)
        stats.add_time("to_host", t_done - (t_host or t_done))
        for (name, _, t_read), frame, out in zip(batch, frames, outputs, strict=True):
            drawing = self.pool.submit(self.draw, frame, out)
            item = (name, drawing, len(out["scores"]), t_read, t_batch)
            _put_while_alive(self.frames_out, item, writer)
            if writer.error is not None:
                raise writer.error

    def composite_on_device(self, uploaded: list, dets: dict, scales, size):
        """Frames of one size: the batch's detections postprocessed and its masks composited
        into the frames on the device (postprocess_batch_on_device, overlay.composite_batch).
        Returns (frames uint8 [B, h, w, 3], the postprocessed batch, drawn bool [B, N] or None
        when the model has no masks)."""
        post = postprocess_batch_on_device(dets, scales, size, self.threshold, True)
        frames, masks = torch.stack(uploaded), post["masks"]
        if masks is None:
            return frames, post, None
        frames, drawn = composite_batch(frames, masks, post["classes"], post["valid"])
        return frames, post, drawn

    @staticmethod
    def to_host(frames: torch.Tensor, post: dict, drawn) -> tuple[list, list]:
        """composite_on_device's result copied to the host: the frames, and per frame its boxes,
        scores and classes (best first) and "drawn" (the instances whose boxes and labels are
        drawn; without masks, "masks" None: draw_instances chooses)."""
        host = {k: post[k].cpu() for k in ("boxes", "scores", "classes")}
        drawn = None if drawn is None else drawn.cpu()
        outputs = []
        for i, n in enumerate(post["counts"].tolist()):
            out = {k: v[i, :n] for k, v in host.items()}
            if drawn is None:
                out["masks"] = None
            else:
                out["drawn"] = torch.nonzero(drawn[i, :n]).flatten().numpy()
            outputs.append(out)
        return list(frames.cpu().numpy()), outputs

    def composite(self, uploaded: torch.Tensor, out: dict) -> np.ndarray:
        """One frame (its copy on the device, `uploaded`) with out's masks blended in there;
        out["drawn"] set to the instances drawn (best first) and out["masks"] dropped (the
        drawing threads add the boxes and labels only). For batches of frames of different
        sizes; frames without masks are left to draw_instances."""
        masks, out["masks"] = out["masks"], None
        order = torch.argsort(-out["scores"], stable=True)
        blended, drawn = composite_masks(uploaded, masks[order.to(masks.device)],
                                         out["classes"][order])
        out["drawn"] = order[drawn].numpy()
        return blended.cpu().numpy()

    def run(self) -> DeployStats:
        reader, writer = _Worker(self.decode, "mrcnn-decode"), _Worker(self.encode, "mrcnn-encode")
        self.pool = ThreadPoolExecutor(self.stats.draw_threads, thread_name_prefix="mrcnn-draw")
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
        self.pool.shutdown(wait=True, cancel_futures=True)
        reader.join(timeout=1.0)
        self.sink.close()
        self.source.close()
