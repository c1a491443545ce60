"""Training a spec's model: `train` assembles model, data, optimizer, resume state and hooks into
an engine.loop.Trainer and runs it.

Re-running `train` with the same results directory resumes from the newest checkpoint (model,
optimizer, AMP scaler, step and RNG states). What a resume does not restore exactly is the
position inside the current data epoch: the loader's epoch is set to `step // steps_per_epoch`
and that epoch restarts from its beginning. A run resumed at an epoch boundary is therefore
identical to an uninterrupted one (bit-exact on CPU; on CUDA as far as the kernels are
deterministic), provided the loader's own randomness (worker augmentation seeds) is keyed to the
epoch too; one resumed mid-epoch differs only in which batches the rest of that epoch shows.

Evaluation is injected (`evaluate_fn`): the engine does not depend on the evaluation code; the
package's top-level `train` passes COCO evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrcnn_helpers.data import build_train_loader
from mrcnn_helpers.engine.artifacts import RESULTS_CSV, BestCheckpointer, ResultsCsv
from mrcnn_helpers.engine.distributed import DistContext, init_distributed, shutdown
from mrcnn_helpers.engine.hooks import (
    CallbackHook,
    EvalHook,
    HookBase,
    NonFiniteCheck,
    PeriodicCheckpointer,
    eval_record,
)
from mrcnn_helpers.engine.lock import ResultsLock
from mrcnn_helpers.engine.logging import (
    ConsoleWriter,
    LoggingHook,
    TensorBoardWriter,
    TrainLog,
    format_eval_line,
)
from mrcnn_helpers.engine.loop import LossMeter, Trainer
from mrcnn_helpers.engine.optim import build_optimizer
from mrcnn_helpers.engine.results_plot import RESULTS_PNG, ResultsPlot
from mrcnn_helpers.engine.resume import (
    Resume,
    class_names_of,
    resume_or_load,
    spec_text,
)
from mrcnn_helpers.engine.rng import seed_everything
from mrcnn_helpers.engine.schedule import is_eval_step
from mrcnn_helpers.errors import CheckpointError, DataError, TrainingError
from mrcnn_helpers.fileio import atomic_write, check_writable_dir
from mrcnn_helpers.model import build_model, load_pretrained
from mrcnn_helpers.model.maskrcnn import place_model
from mrcnn_helpers.runtime import amp_dtype as resolve_amp_dtype
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec.network import network_fields

__all__ = ["DDP_OPTIONS", "LossMeter", "Trainer", "seed_everything", "set_loader_epoch", "train"]

# DistributedDataParallel's options. Buffers (BN running statistics) stay per rank instead of
# being broadcast from rank 0 before every forward (the checkpoint keeps rank 0's); gradients live
# in the all-reduce buckets themselves, saving a copy of every gradient per step.
DDP_OPTIONS = {"broadcast_buffers": False, "gradient_as_bucket_view": True}


def set_loader_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Tell the loader which epoch starts, so its shuffle order depends on the epoch only.

    Calls `set_epoch(epoch)` on the loader, its batch sampler and its sampler, where they have one
    (DistributedSampler does). A plain DataLoader(shuffle=True, generator=g) has none; its
    generator is then reseeded with seed + epoch, which also fixes the workers' seeds for the
    epoch. Either way a resumed run sees the same order for an epoch as an uninterrupted one.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [loader, batch_sampler, getattr(loader, "sampler", None),
                  getattr(batch_sampler, "sampler", None)]
    told = set()
    for obj in candidates:
        if obj is not None and id(obj) not in told and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            told.add(id(obj))
    if told:
        return
    for obj in (loader, getattr(loader, "sampler", None)):
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed + epoch)


def _batches(loader: Any, start_step: int, seed: int) -> Iterator[dict]:
    """Yield batches forever, starting a new epoch (and telling the loader) on exhaustion.

    The epoch of `start_step` restarts from its first batch (see the module doc); set_loader_epoch
    before each epoch is what makes a resumed run see the batches an uninterrupted one sees.
    """
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # iterable-style loader without a length: epochs are counted from 0
        steps_per_epoch = 0
    epoch = start_step // steps_per_epoch if steps_per_epoch else 0
    try:
        while True:
            set_loader_epoch(loader, epoch, seed)
            produced = 0
            for batch in loader:
                produced += 1
                yield batch
            if produced == 0:
                raise DataError(
                    "the training loader yielded no batches: is the training set smaller than "
                    "train_batch_size (batches are dropped when incomplete)?"
                )
            epoch += 1
    finally:  # the trainer closes this generator when training ends, however it ends
        release_workers(loader)


def release_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent worker processes now.

    Left to the interpreter's exit, torch joins each worker with a 5 s timeout before killing
    it: a finished run with 8 workers stayed open for up to 40 s after its last line (H200,
    torch 2.11, 2026-12-03: py-spy showed the main thread in the DataLoader's worker clean-up).
    Shut down here, the workers are told to stop and exit at once. (`_iterator` is where
    DataLoader keeps the iterator its persistent workers belong to.)
    """
    iterator = getattr(loader, "_iterator", None)
    shutdown_workers = getattr(iterator, "_shutdown_workers", None)
    if shutdown_workers is not None:
        shutdown_workers()
        loader._iterator = None




def train(
    spec: Any,
    results_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    model: nn.Module | None = None,
    train_loader: Any = None,
    evaluate_fn: Callable[..., dict] | None = None,
    on_log: Callable[[dict], Any] | HookBase | None = None,
    verbose: bool = False,
    tlt_log: bool = False,
    sync_bn: bool = False,
    hooks: Iterable[HookBase] = (),
) -> dict:
    """Train (or resume training) the model of `spec`, writing checkpoints to `results_dir`.

    - device: default CUDA when available, else CPU (runtime.resolve_device).
    - max_steps: stop once the global step reaches it (an absolute step, not a count), leaving
      the schedule, which follows spec.total_steps, unchanged; a checkpoint is written at the stop.
      Calling again with a larger value (or None) continues from there.
    - model / train_loader: default `build_model(spec)` and `build_train_loader(spec)`; pass your
      own to reuse objects in a notebook. `model(images, targets)` in train mode must return a
      dict of scalar loss tensors (the same keys every step); the loader yields dict batches
      ("image" uint8 [B,3,H,W], "boxes", "classes", "masks").
    - evaluate_fn(model, spec, device=...) -> metrics dict ("AP", "mask_AP", ...), called on the
      main process every num_steps_per_eval steps and at total_steps. None: no evaluation runs
      (checkpoints are still written). `mrcnn_helpers.train` passes COCO evaluation.
    - on_log: called with a plain dict at every log and evaluation (records as in
      engine.logging.train_record and engine.hooks.eval_record); a HookBase is registered as is.
      hooks: more hooks. Both run on the main process only, after the built-in writers.
    - verbose / tlt_log: also print TLT's metric blocks (train.log always gets them); by default
      one progress line per log.
    - sync_bn: with several processes on CUDA, BatchNorm statistics over the global batch.

    Data-parallel: when launched by torchrun (WORLD_SIZE > 1, see engine.distributed) every
    process trains on its shard of the data with spec.train_batch_size images per step; gradients
    are averaged by DistributedDataParallel, the logged losses over ranks. Rank 0 alone locks the
    results directory, prints, writes checkpoints and metrics, and evaluates while the others
    wait. Checkpoints hold the plain model, so a run can resume with any number of processes.

    Writes to results_dir (see engine.checkpoint and engine.artifacts): `model.step-<N>.pth`
    every num_steps_per_eval steps, at total_steps and where max_steps stops (pruned to
    spec.num_checkpoints_to_keep); `metrics_step-<N>.json` per evaluation; `model.best.pth` +
    `best.json`; `model.weights.pth`; `results.csv` and `results.png` (its curves, redrawn
    after each evaluation and at the stop; skipped without matplotlib); `train.log`; `spec.txt`;
    TensorBoard events in `tensorboard/`. Returns dict(step, checkpoint (path or None), metrics (the last
    evaluation's dict or None)); the final metrics are printed once.

    Raises TrainingError on a non-finite loss (naming the first bad step, its loss terms and the
    last good checkpoint; nothing is written after it) and when another run holds results_dir;
    CheckpointError when a checkpoint cannot be written, none of the existing ones can be read,
    or the spec builds a different network than the checkpoint's (resuming then is refused,
    listing the fields that differ).
    """
    results_dir = check_writable_dir(results_dir, option="results directory")
    device = resolve_device(device)
    total_steps = int(spec.total_steps)
    stop_step = total_steps if max_steps is None else min(int(max_steps), total_steps)
    extra = list(hooks)
    if on_log is not None:
        extra.append(on_log if isinstance(on_log, HookBase) else CallbackHook(on_log))

    owns_group = not torch.distributed.is_initialized()
    ctx, device = init_distributed(device)
    autotune = torch.backends.cudnn.benchmark
    try:
        # Every step has the same padded shapes, so cuDNN's autotuner pays off: it times each
        # convolution's algorithms once, in the first steps, and keeps the fastest (what the
        # step benchmarks measure). The user's setting is restored afterwards.
        torch.backends.cudnn.benchmark = autotune or device.type == "cuda"
        # Rank 0 alone writes the results directory, so it alone locks it.
        with ResultsLock(results_dir) if ctx.is_main else contextlib.nullcontext():
            return _train(spec, results_dir, device, ctx, total_steps, stop_step, model,
                          train_loader, evaluate_fn, extra, verbose or tlt_log, sync_bn)
    finally:
        torch.backends.cudnn.benchmark = autotune
        if owns_group:
            shutdown(ctx)


def _train(spec, results_dir: Path, device: torch.device, ctx: DistContext, total_steps: int,
           stop_step: int, model, train_loader, evaluate_fn, extra_hooks: list, blocks: bool,
           sync_bn: bool) -> dict:
    notes: list[str] = []  # printed now, and written to train.log once it is open

    def note(text: str) -> None:
        notes.append(text)
        if ctx.is_main:
            print(text, flush=True)

    seed_everything(int(spec.seed))
    resume = resume_or_load(results_dir, spec, total_steps=total_steps, stop_step=stop_step,
                            evaluates=evaluate_fn is not None)
    if resume.done:
        if ctx.is_main:
            print(resume.message(total_steps, stop_step), flush=True)
            if resume.metrics:
                print(format_eval_line(eval_record(resume.step, resume.metrics), total_steps),
                      flush=True)
        return {"step": resume.step, "checkpoint": str(resume.path), "metrics": resume.metrics}
    note(resume.message(total_steps, stop_step))

    model, train_loader, optimizer, decayed, scaler, amp, metadata = _prepare(
        spec, resume.state, ctx, device, model, train_loader, note)
    if ctx.is_main:
        _write_spec_copy(results_dir / "spec.txt", metadata["spec_text"])
    model, forward_model = _data_parallel(model, spec, ctx, device, sync_bn, note)
    rng_state = resume.state["rng"] if resume.state is not None else None
    resume = dataclasses.replace(resume, state=None)  # the weights are loaded: free the copy

    trainer = Trainer(model=model, forward_model=forward_model, optimizer=optimizer,
                      scaler=scaler, batches=_batches(train_loader, resume.step, int(spec.seed)),
                      spec=spec, device=device, amp_dtype=amp, ctx=ctx, resume=resume,
                      total_steps=total_steps, stop_step=stop_step, metadata=metadata,
                      rng_state=rng_state)
    trainer.register_hooks(default_hooks(spec, results_dir, ctx, resume, total_steps,
                                         evaluate_fn, decayed, notes, blocks) + extra_hooks)
    trainer.train()
    if ctx.is_main and trainer.step < total_steps:
        print(f"Stopped at step {trainer.step} of {total_steps} (max_steps); run again to "
              "continue.", flush=True)
    return {"step": trainer.step,
            "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
            "metrics": trainer.metrics}


def _prepare(spec, state: dict | None, ctx: DistContext, device: torch.device, model,
             train_loader, note: Callable[[str], None]):
    """(model on `device` with the checkpoint's or the pretrained weights, loader, optimizer
    (restored), decayed parameters, GradScaler, autocast dtype, checkpoint metadata)."""
    if model is None:
        model = build_model(spec)
    if state is None and getattr(spec, "checkpoint", ""):
        report = load_pretrained(model, spec.checkpoint)
        summary = getattr(report, "summary", None)
        note(summary() if callable(summary)
             else f"Loaded pretrained weights from {spec.checkpoint}")
    place_model(model, device)
    if train_loader is None:
        train_loader = build_train_loader(spec, rank=ctx.rank, world_size=ctx.world_size)
    optimizer, decayed = build_optimizer(model, spec)
    amp = resolve_amp_dtype(spec.use_amp, device)
    if spec.use_amp and amp is None:
        note(f"note: use_amp ignored on {device.type} (mixed precision is used on CUDA only)")
    # bf16 has fp32's exponent range, so its gradients do not underflow: only fp16 needs scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    text = spec_text(spec)
    class_names, category_ids = class_names_of(train_loader, spec)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint at step {state['step']} does not fit the "
                                  f"model: {exc}") from None
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        class_names = state.get("class_names") or class_names
        category_ids = state.get("category_ids") or category_ids
        if state.get("spec_text") != text:
            note("note: the spec differs from the checkpoint's in fields that keep the network "
                 "(schedule, data, ...); training continues with the current spec")
    metadata = {"spec_text": text, "model_fields": network_fields(spec),
                "class_names": list(class_names), "category_ids": list(category_ids)}
    return model, train_loader, optimizer, decayed, scaler, amp, metadata


def _write_spec_copy(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, text, error=TrainingError)


def _data_parallel(model: nn.Module, spec, ctx: DistContext, device: torch.device,
                   sync_bn: bool, note: Callable[[str], None]) -> tuple[nn.Module, nn.Module]:
    """(model, the module the steps call): DDP around the model under torchrun, else itself."""
    if not ctx.enabled:
        return model, model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    forward_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **DDP_OPTIONS)
    note(f"Data-parallel training on {ctx.world_size} processes, {spec.train_batch_size} "
         f"images each ({spec.train_batch_size * ctx.world_size} per step)")
    return model, forward_model


def default_hooks(spec, results_dir: Path, ctx: DistContext, resume: Resume, total_steps: int,
                  evaluate_fn, decayed: list, notes: list[str], blocks: bool) -> list[HookBase]:
    """The hooks of `train`, in the order they run.

    Writers first (main process only: console, train.log, results.csv, TensorBoard, the best
    checkpoint), so they are ready for records the others publish from before_train on; then the
    non-finite check, the logging window, the checkpointer and the evaluation, in that order
    after each step (a log or checkpoint never follows an unchecked step; an evaluation follows
    its checkpoint); results.png last, drawn from the rows the others have written.
    """
    def due(step: int) -> bool:
        return is_eval_step(step, spec, total_steps)

    writers: list[HookBase] = []
    if ctx.is_main:
        writers = [
            ConsoleWriter(total_steps, resume.step, blocks=blocks),
            TrainLog(results_dir / "train.log", notes=notes),
            ResultsCsv(results_dir / RESULTS_CSV, resume_step=resume.step,
                       drop_eval=resume.unevaluated),
            TensorBoardWriter(results_dir / "tensorboard"),
            BestCheckpointer(results_dir, follows_evaluation=evaluate_fn is not None,
                             start_step=resume.step),
        ]
    work: list[HookBase] = [
        NonFiniteCheck(spec.logging_frequency),
        LoggingHook(spec.logging_frequency, spec.train_batch_size * ctx.world_size, decayed,
                    spec.l2_weight_decay),
        PeriodicCheckpointer(results_dir, spec.num_checkpoints_to_keep, due),
    ]
    if evaluate_fn is not None:
        work.append(EvalHook(evaluate_fn, results_dir, due))
    # Last: it draws results.csv once the records of a step are all in it.
    plots = [ResultsPlot(results_dir / RESULTS_CSV, results_dir / RESULTS_PNG)] if ctx.is_main \
        else []
    return writers + work + plots
