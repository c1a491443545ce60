"""Schedules of TLT's Mask R-CNN: the learning rate (linear warmup, then step decay) and the
steps that are checkpointed and evaluated.

Both are pure functions of the global step, so a resumed run recomputes them instead of storing
a scheduler's state, and they can be plotted from the spec alone (notebooks do).
"""

from __future__ import annotations

from typing import Any


def learning_rate_at(step: int, spec: Any) -> float:
    """Learning rate for the optimizer update that takes the global step from `step` to `step + 1`.

    `step` is 0-based (TensorFlow's global_step before the update), so `learning_rate_at(0)` is the
    rate of the very first update. Reads these spec fields:

    - warmup: for `step < warmup_steps` the rate rises linearly from `warmup_learning_rate`
      (at step 0) towards `init_learning_rate` (reached at step `warmup_steps`);
    - afterwards `init_learning_rate`;
    - step decay: once `step >= learning_rate_steps[i]` the rate is
      `init_learning_rate * learning_rate_decay_levels[i]` (the last boundary passed wins).
      TLT's levels multiply the *initial* rate; they do not compound ("[0.1, 0.01, 0.001]" gives
      0.1x, then 0.01x, then 0.001x of init_learning_rate).

    A decay boundary inside the warmup overrides the warmup rate, as in TLT's implementation
    (decay is applied after warmup in its graph). Pure: no state, no I/O.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    steps = tuple(spec.learning_rate_steps)
    levels = tuple(spec.learning_rate_decay_levels)
    if len(steps) != len(levels):
        # The spec loader checks this too; repeated here because notebooks may pass a
        # dataclasses.replace()'d spec that skipped validation.
        raise ValueError(
            f"learning_rate_steps has {len(steps)} entries but learning_rate_decay_levels has "
            f"{len(levels)}: they must pair up one to one"
        )
    init_lr = float(spec.init_learning_rate)
    warmup_steps = int(spec.warmup_steps)
    if step < warmup_steps:
        warmup_lr = float(spec.warmup_learning_rate)
        lr = warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    else:
        lr = init_lr
    for boundary, level in zip(steps, levels):
        if step >= boundary:
            lr = init_lr * float(level)
    return lr


def is_eval_step(step: int, spec: Any, total_steps: int | None = None) -> bool:
    """Whether training writes a checkpoint and evaluates it after global step `step`.

    Every `num_steps_per_eval` steps and at the last step (`total_steps`, default
    spec.total_steps). A run stopped early (max_steps) also writes a checkpoint where it stops,
    without evaluating it.
    """
    total = int(spec.total_steps if total_steps is None else total_steps)
    return step % int(spec.num_steps_per_eval) == 0 or step == total
