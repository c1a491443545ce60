"""A whole training step replayed from one CUDA graph: forward, loss bookkeeping, backward, SGD.

Why: a Mask R-CNN step launches over a thousand kernels; from Python that costs ~50 ms per step
whatever the image size, which is most of a step at 256 px. The model's CUDA path has no host
synchronization (model/kernels: RoIAlign, NMS; fixed-size sampling and detections), the loss
terms are kept on the device (loop.LossMeter), and the SGD update below reads its learning rate
from a device tensor, so the whole step can be captured once and replayed with one launch.

Sequence: the first WARMUP_STEPS steps run eagerly on a side stream (cuDNN algorithm choice,
lazy allocations, the optimizer's momentum buffers); the next one captures the step for the
batch's shapes and replays it; every later step copies its batch into the graph's static input
buffers and replays. Random numbers (anchor and RoI sampling) advance on every replay, as in
eager mode. The SGD update is torch.optim.SGD's (momentum, dampening 0, weight decay added to
the gradient) written with foreach ops on the optimizer's own momentum buffers, so checkpoints,
resume and the eager path see the same optimizer state.

Not captured (the step stays eager, said once): off CUDA, without the Triton kernels, under
DistributedDataParallel, with fp16 loss scaling, an optimizer other than plain-momentum SGD, or
MRCNN_CUDA_GRAPHS=0; a step that synchronizes with the host (CUDA's sync debug mode watches the
last warm-up step: torchvision's own Mask R-CNN does); and any step whose shapes differ from the
captured ones.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable

import torch

from mrcnn_helpers.model import kernels

ENABLED = os.environ.get("MRCNN_CUDA_GRAPHS", "1") != "0"
WARMUP_STEPS = 3


def unsupported_reason(*, device: torch.device, optimizer, scaler, data_parallel: bool) -> str:
    """Why the step cannot be captured here ("" when it can)."""
    if not ENABLED:
        return "MRCNN_CUDA_GRAPHS=0"
    if device.type != "cuda":
        return f"training on {device.type}"
    if not kernels.available(device):
        return "the Triton kernels are not available"
    if data_parallel:
        return "data-parallel training (DDP) runs eagerly"
    if scaler.is_enabled():
        return "fp16 loss scaling (use bf16)"
    if type(optimizer) is not torch.optim.SGD:
        return f"optimizer {type(optimizer).__name__}"
    for group in optimizer.param_groups:
        if group.get("nesterov") or group.get("dampening") or group.get("maximize"):
            return "SGD with nesterov, dampening or maximize"
    return ""


@torch.no_grad()
def sgd_update(optimizer: torch.optim.SGD, lr: torch.Tensor) -> None:
    """torch.optim.SGD's step (dampening 0, no nesterov; decoupled from nothing: weight decay is
    added to the gradient) with the learning rate read from the 0-d tensor `lr`, on the
    optimizer's own momentum buffers (created as zeros: with dampening 0 the first update then
    equals SGD's, which starts the buffer at the gradient)."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            buffers = []
            for p in params:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


SYNC_WARNING = "synchronizing CUDA operation"  # what CUDA's sync debug mode warns
_DEBUG_MODE_NOTICE = "Synchronization debug mode is a prototype feature"


def first_host_sync(fn: Callable[[], None]) -> str:
    """Run fn with CUDA's sync debug mode on; where it first synchronized with the host (the
    warning and the Python line that raised it), or "" when it did not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEBUG_MODE_NOTICE)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
    try:
        return first_sync_warning(fn)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def first_sync_warning(fn: Callable[[], None]) -> str:
    """Run fn; the first sync warning raised on this thread as "<message> at <file>:<line>", or "".

    The debug mode is global to the process: the loader's pin-memory thread, a deploy decoder
    and the like warn too while fn runs. Their sync warnings say nothing of the step and are
    dropped; warnings of other kinds, from any thread, are shown as usual.
    """
    me = threading.get_ident()
    found: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show = warnings.showwarning  # catch_warnings puts it back on exit

        def record(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if SYNC_WARNING not in text:
                show(message, category, filename, lineno, file, line)
            elif threading.get_ident() == me:
                found.append(f"{text.splitlines()[0].split(' (Triggered')[0]} at "
                             f"{filename}:{lineno}")

        warnings.showwarning = record
        fn()
    return found[0] if found else ""


class GraphedTrainStep:
    """Runs training steps from a CUDA graph once warmed up; see the module docstring.

    eager_step(images, targets, lr) is the trainer's own step (used for warm-up); model(images,
    targets) -> dict of loss tensors in train mode, run under autocast(amp_dtype); meter is the
    LossMeter.
    """

    def __init__(self, *, model, amp_dtype, optimizer, meter, eager_step: Callable,
                 device: torch.device, note: Callable[[str], None]):
        self.model = model
        self.amp_dtype = amp_dtype
        self.optimizer = optimizer
        self.meter = meter
        self.eager_step = eager_step
        self.device = device
        self.note = note
        self.groups = optimizer.param_groups
        self.steps_seen = 0
        self.graph = None
        self.shapes = None
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.capture_seconds = None
        self.failed = False  # the capture failed once: eager from then on
        self._side = None

    def __call__(self, images: torch.Tensor, targets: dict, lr: float) -> None:
        shapes = (tuple(images.shape), tuple((k, tuple(v.shape)) for k, v in targets.items()))
        if self.steps_seen < WARMUP_STEPS or (self.graph is not None and shapes != self.shapes):
            self.steps_seen += 1
            last_warm_up = self.steps_seen == WARMUP_STEPS and self.graph is None
            self._warm_up(images, targets, lr, check_syncs=last_warm_up and not self.failed)
            return
        self.steps_seen += 1
        if self.failed:
            self.eager_step(images, targets, lr)
            return
        if self.graph is None:
            try:
                self._capture(images, targets, shapes)
            except RuntimeError as exc:  # e.g. a host sync in a model given to train()
                self.failed = True
                self.graph = None
                self.optimizer.zero_grad(set_to_none=True)
                self.note("note: the training step cannot be captured in a CUDA graph "
                          f"({str(exc).splitlines()[0]}); training runs eagerly")
                self.eager_step(images, targets, lr)
                return
        self.static_images.copy_(images, non_blocking=True)
        for key, value in targets.items():
            self.static_targets[key].copy_(value, non_blocking=True)
        self.lr.fill_(float(lr))
        self.graph.replay()
        self.meter.count_step()

    def _warm_up(self, images: torch.Tensor, targets: dict, lr: float, check_syncs: bool) -> None:
        def run():
            self._on_side_stream(lambda: self.eager_step(images, targets, lr))

        if not check_syncs:
            run()
            return
        # The last warm-up step looks for host syncs: a step that waits for the host cannot be
        # captured, and a capture that fails leaves CUDA's random-number state unusable.
        sync = first_host_sync(run)
        if sync:
            self.failed = True
            self.note("note: the training step cannot be captured in a CUDA graph (it "
                      f"synchronizes with the host: {sync}); training runs eagerly")

    def _on_side_stream(self, fn) -> None:
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            fn()
        current.wait_stream(self._side)

    def _capture(self, images: torch.Tensor, targets: dict, shapes) -> None:
        start = time.perf_counter()
        for group in self.groups:  # allocated before capture: they must outlive the graph pool
            for p in group["params"]:
                state = self.optimizer.state[p]
                if group["momentum"] and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
        self.static_images = images.clone()
        self.static_targets = {k: v.clone() for k, v in targets.items()}
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread keeps calling CUDA while this captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.autocast(
                "cuda", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                cache_enabled=False):
            losses = self.model(self.static_images, self.static_targets)
            self.meter.accumulate(losses)
            total = sum(losses[name].float() for name in sorted(losses))
            total.backward()
            sgd_update(self.optimizer, self.lr)
        self.graph, self.shapes = graph, shapes
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.note(f"note: training step captured in a CUDA graph in {self.capture_seconds:.2f} s "
                  f"(batch {list(images.shape)}); later steps replay it")
