"""The training loop: spec -> model + data -> SGD with warmup/step decay -> checkpoints + eval.

Re-running `train` with the same results directory resumes from the newest checkpoint (model,
optimizer, AMP scaler, step and RNG states). What a resume does not restore exactly is the
position inside the current data epoch: the loader's epoch is set to `step // steps_per_epoch`
and that epoch restarts from its beginning. A run resumed at an epoch boundary is therefore
identical to an uninterrupted one (bit-exact on CPU; on CUDA as far as the kernels are
deterministic), provided the loader's own randomness (worker augmentation seeds) is keyed to the
epoch too; one resumed mid-epoch differs only in which batches the rest of that epoch shows.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from mrcnn_helpers.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    checkpoint_path,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from mrcnn_helpers.engine.distributed import (
    DistContext,
    all_mean,
    init_distributed,
    shutdown,
    wait_for_main,
)
from mrcnn_helpers.engine.logging import MetricLogger
from mrcnn_helpers.engine.optim import build_optimizer, l2_loss_of
from mrcnn_helpers.engine.schedule import learning_rate_at
from mrcnn_helpers.engine.spec_fields import (
    check_model_fields,
    class_names_of,
    model_fields,
    spec_text,
)
from mrcnn_helpers.errors import CheckpointError, DataError, TrainingError
from mrcnn_helpers.model.maskrcnn import place_model

# Target entries of a batch the model consumes in train mode (see mrcnn_helpers.data).
TARGET_KEYS = ("boxes", "classes", "masks")


# DistributedDataParallel's options. Buffers (BN running statistics) stay per rank instead of
# being broadcast from rank 0 before every forward (the checkpoint keeps rank 0's); gradients live
# in the all-reduce buckets themselves, saving a copy of every gradient per step.
DDP_OPTIONS = {"broadcast_buffers": False, "gradient_as_bucket_view": True}


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python `random` from the spec's seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and os.replace (never half-written).

    Raises TrainingError naming the path and the OS error (disk full, read-only directory);
    the previous file at `path`, if any, is then unchanged and no temporary file is left.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise TrainingError(f"could not write {path}: {exc.strerror or exc} (errno {exc.errno}); "
                            "the previous file, if any, is unchanged") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _batches(loader: Any, start_step: int, seed: int) -> Iterator[dict]:
    """Yield batches forever, starting a new epoch (and telling the loader) on exhaustion."""
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # iterable-style loader without a length: epochs are counted from 0
        steps_per_epoch = 0
    epoch = start_step // steps_per_epoch if steps_per_epoch else 0
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


def _images_of(batch: dict) -> torch.Tensor:
    for key in ("image", "images"):
        if key in batch:
            return batch[key]
    raise DataError(f"training batch has no 'image' entry (keys: {sorted(batch)})")


def _amp_setup(spec: Any, device: torch.device, say: Callable[[str], None]):
    """(autocast dtype or None, GradScaler): bf16 where supported, fp16 + loss scaling otherwise."""
    amp_dtype = None
    if spec.use_amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif spec.use_amp:
        say(f"note: use_amp ignored on {device.type} (mixed precision is used on CUDA only)")
    # bf16 has fp32's exponent range, so its gradients do not underflow: only fp16 needs scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return amp_dtype, scaler


def train(
    spec: Any,
    results_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    model: nn.Module | None = None,
    train_loader: Any = None,
    evaluate_fn: Callable[..., dict] | None = None,
    on_log: Callable[[dict], Any] | None = None,
    verbose: bool = True,
    sync_bn: bool = False,
) -> dict:
    """Train (or resume training) the model of `spec`, writing checkpoints to `results_dir`.

    - device: default CUDA when available, else CPU.
    - max_steps: stop once the global step reaches it (an absolute step, not a count), leaving
      the schedule, which follows spec.total_steps, unchanged; a checkpoint is written at the stop.
      Calling again with a larger value (or None) continues from there.
    - model / train_loader / evaluate_fn: default `build_model(spec)`, `build_train_loader(spec)`
      and `evaluate_model(model, spec, device=...)`; pass your own to reuse objects in a notebook.
      `model(images, targets)` in train mode must return a dict of scalar loss tensors; the loader
      yields dict batches ("image" uint8 [B,3,H,W], "boxes", "classes", "masks");
      `evaluate_fn(model, spec, device=...)` returns a metrics dict ("AP", "mask_AP", ...).
    - on_log: called with a plain dict at every log and evaluation (see MetricLogger).
    - verbose: TLT's full metric blocks (True) or one line per log (False).
    - sync_bn: with several processes on CUDA, BatchNorm statistics over the global batch.

    Data-parallel: when launched by torchrun (WORLD_SIZE > 1, see engine.distributed) every
    process trains on its shard of the data with spec.train_batch_size images per step; gradients
    are averaged by DistributedDataParallel, the logged losses over ranks. Rank 0 alone prints,
    writes checkpoints and metrics, and evaluates while the others wait. Checkpoints hold the plain
    model, so a run can resume with any number of processes.

    Every num_steps_per_eval steps and at total_steps a checkpoint `model.step-<N>.pth` is written,
    old ones are pruned to spec.num_checkpoints_to_keep, and the model is evaluated; the metrics go
    to `metrics_step-<N>.json` and TensorBoard. Returns dict(step, checkpoint (path or None),
    metrics (the last evaluation's dict or None)).

    Raises TrainingError on a non-finite loss (naming the step, the loss terms and the last good
    checkpoint; nothing is written after the bad step), CheckpointError when a checkpoint cannot
    be written, none of the existing ones can be read, or the spec builds a different network
    than the checkpoint's (resuming then is refused, listing the fields that differ).
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    total_steps = int(spec.total_steps)
    stop_step = total_steps if max_steps is None else min(int(max_steps), total_steps)

    owns_group = not torch.distributed.is_initialized()
    ctx, device = init_distributed(device)
    try:
        return _train(spec, results_dir, device, ctx, total_steps, stop_step, model, train_loader,
                      evaluate_fn, on_log, verbose, sync_bn)
    finally:
        if owns_group:
            shutdown(ctx)


def _train(spec, results_dir: Path, device: torch.device, ctx: DistContext, total_steps: int,
           stop_step: int, model, train_loader, evaluate_fn, on_log, verbose: bool,
           sync_bn: bool) -> dict:
    def say(text: str) -> None:
        if ctx.is_main:
            print(text, flush=True)

    seed_everything(int(spec.seed))
    resumed = load_latest_checkpoint(results_dir, map_location="cpu")
    if resumed is not None:
        ckpt_path, ckpt = resumed
        check_model_fields(model_fields(spec), ckpt.get("model_fields"), ckpt_path)
        start_step = int(ckpt["step"])
        # A run stopped between writing a checkpoint and its evaluation (killed, disk full)
        # evaluates that checkpoint when it comes back (below), so no evaluation goes missing.
        unevaluated = (_is_eval_step(start_step, spec, total_steps)
                       and _read_metrics(results_dir, start_step) is None)
        if start_step >= total_steps and not unevaluated:
            say(f"Training is finished: {ckpt_path} is at step {start_step} of {total_steps}.")
            return {"step": start_step, "checkpoint": str(ckpt_path),
                    "metrics": _read_metrics(results_dir, start_step)}
        if start_step >= stop_step and not unevaluated:
            say(f"Stopped: {ckpt_path} is at step {start_step}, max_steps is {stop_step}.")
            return {"step": start_step, "checkpoint": str(ckpt_path),
                    "metrics": _read_metrics(results_dir, start_step)}
        say(f"Resuming from {ckpt_path} at step {start_step} of {total_steps}"
            + (" (evaluating it first: its evaluation is missing)" if unevaluated else ""))
    else:
        ckpt_path, ckpt, start_step, unevaluated = None, None, 0, False

    if model is None:
        from mrcnn_helpers.model import build_model

        model = build_model(spec)
    if ckpt is None and getattr(spec, "checkpoint", ""):
        from mrcnn_helpers.model import load_pretrained

        report = load_pretrained(model, spec.checkpoint)
        summary = getattr(report, "summary", None)
        say(summary() if callable(summary) else f"Loaded pretrained weights from {spec.checkpoint}")
    place_model(model, device)
    if train_loader is None:
        from mrcnn_helpers.data import build_train_loader

        train_loader = build_train_loader(spec, rank=ctx.rank, world_size=ctx.world_size)
    if evaluate_fn is None:
        from mrcnn_helpers.evaluate import evaluate_model

        evaluate_fn = evaluate_model

    optimizer, decayed = build_optimizer(model, spec)
    amp_dtype, scaler = _amp_setup(spec, device, say)
    text = spec_text(spec)
    class_names, category_ids = class_names_of(train_loader, spec)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit the model: {exc}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        class_names = ckpt.get("class_names") or class_names
        category_ids = ckpt.get("category_ids") or category_ids
        if ckpt.get("spec_text") != text:
            say("note: the spec differs from the checkpoint's in fields that keep the network "
                "(schedule, data, ...); training continues with the current spec")
    spec_file = results_dir / "spec.txt"

    if ctx.is_main and (not spec_file.is_file() or spec_file.read_text(encoding="utf-8") != text):
        write_text_atomic(spec_file, text)
    forward_model = model
    if ctx.enabled:
        if sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            forward_model = model
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **DDP_OPTIONS)
        say(f"Data-parallel training on {ctx.world_size} processes, {spec.train_batch_size} "
            f"images each ({spec.train_batch_size * ctx.world_size} per step)")

    logger = MetricLogger(
        total_steps=total_steps, logging_frequency=spec.logging_frequency,
        batch_size=spec.train_batch_size * ctx.world_size, start_step=start_step,
        tensorboard_dir=results_dir / "tensorboard", verbose=verbose, on_log=on_log,
        rank=ctx.rank)
    # Restored last: everything above may draw random numbers (model init, logger set-up), and
    # the run must continue with exactly the stream the interrupted run would have seen.
    if ckpt is not None:
        restore_rng_state(ckpt["rng"])
    if ctx.enabled:
        # Each rank draws its own anchor / RoI samples (the checkpoint's RNG is rank 0's).
        torch.manual_seed(int(spec.seed) + 7919 * ctx.rank + start_step)
    del ckpt

    def make_state(step: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": capture_rng_state(), "spec_text": text,
            "model_fields": model_fields(spec), "class_names": list(class_names),
            "category_ids": list(category_ids),
        }

    metrics = _read_metrics(results_dir, start_step) if start_step else None
    # Every rank decided `unevaluated` before DDP's construction (a collective), hence before
    # rank 0 can have written the metrics: all ranks agree and meet at wait_for_main.
    if unevaluated:
        if ctx.is_main:
            metrics = _evaluate(model, spec, device, evaluate_fn, results_dir, start_step, logger)
        wait_for_main(ctx)
    last_checkpoint = ckpt_path
    step = start_step
    model.train()
    batches = _batches(train_loader, start_step, int(spec.seed))
    try:
        while step < stop_step:
            batch = next(batches)
            lr = learning_rate_at(step, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = _images_of(batch).to(device, non_blocking=True)
            targets = {k: batch[k].to(device, non_blocking=True) for k in TARGET_KEYS if k in batch}
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                losses = forward_model(images, targets)
            if not isinstance(losses, dict) or not losses:
                raise TrainingError(f"the model returned {type(losses).__name__} in train mode; "
                                    "expected a dict of scalar loss tensors")
            names = sorted(losses)
            total = sum(losses[name].float() for name in names)
            # One host transfer per step for all terms: needed for the finiteness check anyway.
            values = all_mean(torch.stack([losses[n].detach().float() for n in names]),
                              ctx).cpu().tolist()
            terms = dict(zip(names, values))
            if not all(math.isfinite(v) for v in values):
                shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
                where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                         else "no checkpoint was written yet")
                # Reported as step + 1: the step this update would have completed, the numbering
                # of the logs and of the checkpoint names.
                raise TrainingError(
                    f"non-finite loss at step {step + 1} (lr {lr:.6g}): {shown}; {where}. "
                    "Nothing was written after this step; try a lower init_learning_rate, a "
                    "longer warmup, or check the data of this step.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1

            logger.update(terms)
            if logger.should_log(step):
                logger.log(step, learning_rate=lr,
                           l2_loss=l2_loss_of(decayed, float(spec.l2_weight_decay)))
            at_eval = _is_eval_step(step, spec, total_steps)
            if at_eval or step == stop_step:
                paused = time.perf_counter()
                last_checkpoint = checkpoint_path(results_dir, step)
                if ctx.is_main:
                    save_checkpoint(last_checkpoint, make_state(step))
                    prune_checkpoints(results_dir, int(spec.num_checkpoints_to_keep))
                    if at_eval:
                        metrics = _evaluate(model, spec, device, evaluate_fn, results_dir, step,
                                            logger)
                wait_for_main(ctx)
                logger.exclude_time(time.perf_counter() - paused)  # throughput of training only
    finally:
        logger.close()
        batches.close()
    if step < total_steps:
        say(f"Stopped at step {step} of {total_steps} (max_steps); run again to continue.")
    return {"step": step, "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "metrics": metrics}


def _is_eval_step(step: int, spec, total_steps: int) -> bool:
    """Whether training evaluates (and saves metrics_step-<step>.json) after `step`."""
    return step % int(spec.num_steps_per_eval) == 0 or step == total_steps


def _evaluate(model, spec, device, evaluate_fn, results_dir: Path, step: int,
              logger: MetricLogger) -> dict:
    """Evaluate in eval mode without disturbing the training RNG streams; save metrics JSON."""
    rng = capture_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            metrics = evaluate_fn(model, spec, device=device)
    finally:
        model.train()
        # Evaluation draws random numbers (data loader seeds, ...). Restoring the streams keeps
        # training after an evaluation identical to training resumed from its checkpoint.
        restore_rng_state(rng)
    path = results_dir / f"metrics_step-{step}.json"
    write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True, default=_jsonable))
    logger.log_eval(step, metrics, source=path.name)
    return metrics


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metric value of type {type(value).__name__} is not JSON serializable")


def _read_metrics(results_dir: Path, step: int) -> dict | None:
    path = results_dir / f"metrics_step-{step}.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
