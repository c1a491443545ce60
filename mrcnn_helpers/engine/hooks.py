"""Hooks of the training loop: what happens around the steps (engine.loop.Trainer).

A hook overrides any of

    before_train()       once, after resuming, before the first step
    after_step()         after every step (trainer.step is the global step just completed)
    after_train()        once at the end, also when training fails (trainer.error is then set)
    on_record(record)    every record a hook publishes through trainer.publish

Records are plain dicts with an "event": "train" (the loss averages of a logging window, see
engine.logging.train_record), "eval" (the scalar metrics of an evaluation, `eval_record`),
"checkpoint" ({"step", "path"}) or "message" ({"text"}: trainer.say). Writers (console, train.log, results.csv, TensorBoard, a notebook's plot) are
hooks that only listen to records; the hooks here do the work that produces them. Hooks run in
the order they are registered; `after_step` work that must precede other work (the non-finite
check before a checkpoint, the checkpoint before its evaluation) is ordered by registration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mrcnn_helpers.engine.checkpoint import (
    checkpoint_path,
    metrics_path,
    prune_checkpoints,
    save_checkpoint,
)
from mrcnn_helpers.engine.distributed import wait_for_main
from mrcnn_helpers.engine.rng import capture_rng_state, restore_rng_state
from mrcnn_helpers.errors import TrainingError
from mrcnn_helpers.fileio import atomic_write_json, json_safe

# Record events the `on_log` callback receives (its documented contract).
LOG_EVENTS = ("train", "eval")


class HookBase:
    """Base class of hooks; `trainer` is set when the hook is registered."""

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def on_record(self, record: dict) -> None:
        pass


class CallbackHook(HookBase):
    """Calls `fn(record)` with a copy of every train and eval record (train's `on_log`)."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def on_record(self, record: dict) -> None:
        if record.get("event") in LOG_EVENTS:
            self.fn(dict(record))


class NonFiniteCheck(HookBase):
    """Reads the device-side finiteness record every `period` steps and at the last step.

    The step itself never waits for the device: a non-finite loss is only noted there (see
    engine.loop.LossMeter). This hook turns that note into a TrainingError naming the first
    bad step; PeriodicCheckpointer makes the same check before every checkpoint it writes.
    """

    def __init__(self, period: int):
        self.period = max(1, int(period))

    def after_step(self) -> None:
        step = self.trainer.step
        if step % self.period == 0 or step == self.trainer.total_steps:
            self.trainer.check_finite()


class PeriodicCheckpointer(HookBase):
    """Writes `model.step-<N>.pth` at the steps `due(N)` and where the run stops, then prunes.

    Only the main process writes; the others wait for it. Before writing, the non-finite check
    runs on every rank, so a checkpoint never holds weights updated by a non-finite loss. Publishes
    a "checkpoint" record. Time spent here is left out of the throughput.
    """

    def __init__(self, results_dir: Path, keep: int, due: Callable[[int], bool]):
        self.results_dir = Path(results_dir)
        self.keep = int(keep)
        self.due = due

    def after_step(self) -> None:
        trainer = self.trainer
        step = trainer.step
        if not (self.due(step) or step == trainer.stop_step):
            return
        trainer.check_finite()
        with trainer.paused():
            path = checkpoint_path(self.results_dir, step)
            if trainer.ctx.is_main:
                save_checkpoint(path, trainer.checkpoint_state())
                prune_checkpoints(self.results_dir, self.keep)
            wait_for_main(trainer.ctx)
            trainer.last_checkpoint = path
            trainer.publish({"event": "checkpoint", "step": step, "path": str(path)})


class EvalHook(HookBase):
    """Evaluates the model at the steps `due(N)` (after their checkpoint) and, when resuming, a
    checkpoint whose evaluation is missing.

    evaluate_fn(model, spec, device=...) -> metrics dict; it runs on the main process, in eval
    mode under no_grad, with the RNG streams restored afterwards, so training after an evaluation
    is identical to training resumed from its checkpoint. The eval record is published first,
    then `metrics_step-<N>.json` is written: that file marks the evaluation as done, so a run
    stopped in between evaluates the step again on resume (and the listeners see it again).
    """

    def __init__(self, evaluate_fn: Callable[..., dict], results_dir: Path,
                 due: Callable[[int], bool]):
        self.evaluate_fn = evaluate_fn
        self.results_dir = Path(results_dir)
        self.due = due

    def before_train(self) -> None:
        # Every rank decided `unevaluated` before DDP's construction (a collective), hence before
        # rank 0 can have written the metrics: all ranks agree and meet at wait_for_main.
        if self.trainer.resume.unevaluated:
            self.evaluate(self.trainer.step)

    def after_step(self) -> None:
        if self.due(self.trainer.step):
            self.evaluate(self.trainer.step)

    def evaluate(self, step: int) -> None:
        trainer = self.trainer
        with trainer.paused():
            if trainer.ctx.is_main:
                metrics = json_safe(self._run())
                if not isinstance(metrics, dict):
                    raise TrainingError(f"the evaluation function returned "
                                     f"{type(metrics).__name__}; expected a dict of metrics")
                trainer.metrics = metrics
                trainer.publish(eval_record(step, metrics))
                atomic_write_json(metrics_path(self.results_dir, step), metrics)
            wait_for_main(trainer.ctx)

    def _run(self) -> dict:
        trainer = self.trainer
        rng = capture_rng_state()
        trainer.model.eval()
        try:
            with torch.no_grad():
                return self.evaluate_fn(trainer.model, trainer.spec, device=trainer.device)
        finally:
            trainer.model.train()
            # Evaluation draws random numbers (data loader seeds, ...): restoring the streams
            # keeps training after an evaluation identical to training resumed from its
            # checkpoint.
            restore_rng_state(rng)


def eval_record(step: int, metrics: dict) -> dict:
    """{"event": "eval", "step", <every top-level number of metrics>} (nested tables left out;
    ints stay ints)."""
    scalars = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"event": "eval", "step": int(step), **scalars}
