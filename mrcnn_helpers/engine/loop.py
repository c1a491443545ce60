"""The loop of training: `Trainer` runs steps and calls hooks around them; `LossMeter` keeps the
loss terms on the device.

`Trainer.run_step` is one step (batch -> learning rate -> forward under autocast -> backward ->
optimizer step); everything around the steps is a hook (engine.hooks: the non-finite check,
checkpoints, evaluation; engine.logging and engine.artifacts: what is printed and written). The
loop is `Trainer.train`. engine.trainer.train assembles a Trainer for a spec.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrcnn_helpers.engine.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from mrcnn_helpers.engine.distributed import DistContext, all_mean, all_min
from mrcnn_helpers.engine.graphed_step import GraphedTrainStep, unsupported_reason
from mrcnn_helpers.engine.resume import Resume
from mrcnn_helpers.engine.rng import capture_rng_state, restore_rng_state
from mrcnn_helpers.engine.schedule import learning_rate_at
from mrcnn_helpers.errors import DataError, TrainingError
from mrcnn_helpers.runtime import autocast

# Target entries of a batch the model consumes in train mode (see mrcnn_helpers.data).
TARGET_KEYS = ("boxes", "classes", "masks")


def _images_of(batch: dict) -> torch.Tensor:
    if "image" in batch:
        return batch["image"]
    raise DataError(f"training batch has no 'image' entry (keys: {sorted(batch)})")


class LossMeter:
    """The steps' loss terms, kept on the device: sums over the logging window and the first step
    whose loss was not finite (with its terms).

    `add` never transfers to the host, so a step does not wait for the device (and can be
    captured in a CUDA graph: every update is in place on tensors of fixed shape). The host reads
    the sums at log steps (`read_window`) and the non-finite record before every checkpoint and
    at log steps (`first_non_finite`); under data parallelism both are reduced over ranks then.
    """

    _NONE = 2**62  # "no non-finite step yet"; larger than any step, so a min over ranks works

    def __init__(self, device: torch.device, start_step: int):
        self.names: list[str] | None = None
        self._count = 0
        self._step = torch.tensor(int(start_step), dtype=torch.int64, device=device)
        self._first_bad = torch.full((), self._NONE, dtype=torch.int64, device=device)
        self._sums = self._bad_terms = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Record one step's loss terms (scalar tensors on the device)."""
        self.accumulate(losses)
        self.count_step()

    def count_step(self) -> None:
        """Count a step whose terms `accumulate` added on the device (a CUDA graph replays the
        accumulation; the host counts the replays)."""
        self._count += 1

    def accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        """The device part of `add`: in-place updates of fixed-shape tensors only."""
        names = sorted(losses)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise TrainingError(f"the model returned the loss terms {names}; earlier steps "
                                f"returned {self.names}: the terms must not change")
        values = torch.stack([losses[n].detach().float() for n in names])
        if self._sums is None:
            self._sums = torch.zeros_like(values)
            self._bad_terms = torch.zeros_like(values)
        self._sums.add_(values)
        self._step.add_(1)
        new_bad = torch.logical_and(~torch.isfinite(values).all(), self._first_bad == self._NONE)
        self._first_bad.copy_(torch.where(new_bad, self._step, self._first_bad))
        self._bad_terms.copy_(torch.where(new_bad, values, self._bad_terms))

    def read_window(self, ctx: DistContext) -> tuple[dict[str, float], int]:
        """({term: average over the window's steps (and ranks)}, steps) and a new window."""
        count = self._count
        if self._sums is None or count == 0:
            return {}, 0
        sums = all_mean(self._sums, ctx).tolist()
        self._sums.zero_()
        self._count = 0
        return {name: total / count for name, total in zip(self.names, sums)}, count

    def first_non_finite(self, ctx: DistContext) -> tuple[int, dict[str, float] | None] | None:
        """(step, its terms) of the first non-finite loss on any rank, or None. The terms are
        None when another rank saw that step's loss."""
        step = int(all_min(self._first_bad, ctx))
        if step == self._NONE:
            return None
        local = int(self._first_bad) == step
        return step, dict(zip(self.names, self._bad_terms.tolist())) if local else None


class Trainer:
    """Runs steps and calls hooks around them (detectron2's TrainerBase, in small).

    Attributes hooks use: step (global steps completed), total_steps, stop_step, spec, device,
    ctx (DistContext), model (the plain module), meter (LossMeter), lr (rate of the last step),
    resume (engine.resume.Resume), last_checkpoint (Path or None), metrics (the last
    evaluation's dict or None), metadata (what checkpoints record besides the weights),
    paused_seconds (time spent in `paused()` blocks), error (the exception that ended training).
    """

    def __init__(self, *, model: nn.Module, forward_model: nn.Module, optimizer, scaler,
                 batches: Iterator[dict], spec: Any, device: torch.device, amp_dtype,
                 ctx: DistContext, resume: Resume, total_steps: int, stop_step: int,
                 metadata: dict, rng_state: dict | None = None):
        self.model, self.forward_model = model, forward_model
        self.optimizer, self.scaler, self.batches = optimizer, scaler, batches
        self.spec, self.device, self.amp_dtype, self.ctx = spec, device, amp_dtype, ctx
        self.resume, self.metadata, self.rng_state = resume, metadata, rng_state
        self.total_steps, self.stop_step = int(total_steps), int(stop_step)
        self.step = resume.step
        self.meter = LossMeter(device, resume.step)
        self.lr: float | None = None
        self.last_checkpoint: Path | None = resume.path
        self.metrics: dict | None = resume.metrics
        self.paused_seconds = 0.0
        self.error: BaseException | None = None
        self.hooks: list = []
        self._checked_step = resume.step
        self.graph_reason = unsupported_reason(device=device, optimizer=optimizer, scaler=scaler,
                                               data_parallel=ctx.enabled)
        self.graphed = None if self.graph_reason else GraphedTrainStep(
            model=forward_model, amp_dtype=amp_dtype, optimizer=optimizer, meter=self.meter,
            eager_step=self._eager_update, device=device, note=self.say)

    def register_hooks(self, hooks: Iterable) -> None:
        for hook in hooks:
            # A proxy: hooks held by the trainer must not keep it alive in a cycle.
            hook.trainer = weakref.proxy(self)
            self.hooks.append(hook)

    def publish(self, record: dict) -> None:
        """Hand `record` to every hook's on_record, in registration order."""
        for hook in self.hooks:
            hook.on_record(record)

    def say(self, text: str) -> None:
        self.publish({"event": "message", "text": text})

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block (checkpoints, evaluation) is left out of the throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def train(self) -> None:
        """before_train, then run_step + after_step until stop_step, then after_train."""
        try:
            for hook in self.hooks:
                hook.before_train()
            if self.graph_reason and self.device.type == "cuda":
                self.say(f"note: training steps run eagerly, not from a CUDA graph "
                         f"({self.graph_reason})")
            self._continue_random_streams()
            self.model.train()
            while self.step < self.stop_step:
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            for hook in self.hooks:
                hook.after_train()
            self.batches.close()

    def _continue_random_streams(self) -> None:
        # Restored after every before_train (set-up and a resume's evaluation may draw random
        # numbers): the run continues with exactly the stream the interrupted run would have seen.
        if self.rng_state is not None:
            restore_rng_state(self.rng_state)
        if self.ctx.enabled:
            # Each rank draws its own anchor / RoI samples (the checkpoint's RNG is rank 0's).
            torch.manual_seed(int(self.spec.seed) + 7919 * self.ctx.rank + self.step)

    def run_step(self) -> None:
        """One optimizer update: batch -> lr -> forward (autocast) -> backward -> step.

        Nothing here waits for the device: the loss terms go to the LossMeter on the device. On
        CUDA the step is replayed from a CUDA graph once warmed up (engine.graphed_step).
        """
        batch = next(self.batches)
        lr = learning_rate_at(self.step, self.spec)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = _images_of(batch).to(self.device, non_blocking=True)
        targets = {k: batch[k].to(self.device, non_blocking=True)
                   for k in TARGET_KEYS if k in batch}
        if self.graphed is not None:
            self.graphed(images, targets, lr)
        else:
            self._eager_update(images, targets, lr)
        self.step += 1
        self.lr = lr

    def _eager_update(self, images: torch.Tensor, targets: dict, lr: float) -> None:
        with autocast(self.device, self.amp_dtype):
            losses = self.forward_model(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TrainingError(f"the model returned {type(losses).__name__} in train mode; "
                                "expected a dict of scalar loss tensors")
        self.meter.add(losses)
        total = sum(losses[name].float() for name in sorted(losses))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def check_finite(self) -> None:
        """Raise TrainingError if a step since the previous check had a non-finite loss.

        Names the first such step (steps are numbered as logs and checkpoints are: the step the
        update completed), its loss terms and learning rate, the steps since the previous check
        and the last good checkpoint. Every rank must call it at the same steps.
        """
        if self._checked_step == self.step:
            return
        since, self._checked_step = self._checked_step, self.step
        found = self.meter.first_non_finite(self.ctx)
        if found is None:
            return
        bad_step, terms = found
        shown = (", ".join(f"{k}={v:.6g}" for k, v in terms.items()) if terms is not None
                 else "seen on another rank")
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        lr = learning_rate_at(bad_step - 1, self.spec)
        raise TrainingError(
            f"non-finite loss at step {bad_step} (lr {lr:.6g}): {shown}; {where}. Found by the "
            f"check after step {self.step} (steps {since + 1}-{self.step} since the previous "
            "check); nothing was written after the bad step. Try a lower init_learning_rate, a "
            "longer warmup, or check the data of that step.")

    def checkpoint_state(self) -> dict:
        """Everything a resume needs, in checkpoint.py's format (plain values, weights_only)."""
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": capture_rng_state(), **self.metadata,
        }

    def inference_state(self) -> dict:
        """The weights and metadata (what checkpoint.save_inference_weights keeps)."""
        return {"step": self.step, "model": self.model.state_dict(), **self.metadata}
