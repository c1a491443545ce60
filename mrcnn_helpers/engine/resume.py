"""Where a run continues (`resume_or_load`), and what a checkpoint records about the spec and
the data: the companion of engine/checkpoint.py, which reads and writes the files.

A run resumes from the newest readable checkpoint of its results directory, refused when the
spec now builds another network (spec.network's identity), evaluated first when the run was
stopped between writing it and evaluating it; schedule and data fields may change between runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrcnn_helpers.engine.checkpoint import (
    load_latest_checkpoint,
    read_metrics,
    require_training_state,
)
from mrcnn_helpers.engine.schedule import is_eval_step
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.spec import format_spec
from mrcnn_helpers.spec.network import (
    class_names_with_background,
    network_differences,
    network_fields,
)


def spec_text(spec: Any) -> str:
    """The spec in TLT text format (what checkpoints and RESULTS_DIR/spec.txt store)."""
    return format_spec(spec)


def class_names_of(train_loader: Any, spec: Any) -> tuple[list[str], list[int]]:
    """(class_names, category_ids) of the training set, for inference from a checkpoint.

    Read from the loader's dataset (`class_names`: index 0 = "background"; `category_ids`: COCO
    id of contiguous label i at index i-1). A dataset without them (e.g. a user's own loader)
    gets generic names "class_<i>" and ids 1..num_classes-1, so a checkpoint can always be used.
    """
    dataset = getattr(train_loader, "dataset", None)
    names = class_names_with_background(getattr(dataset, "class_names", None),
                                        int(spec.data_config.num_classes),
                                        source="the training set's class names")
    ids = getattr(dataset, "category_ids", None)
    if ids is None:
        ids = list(range(1, len(names)))
    return names, [int(i) for i in ids]


def check_network(spec: Any, state: dict, source: Any) -> None:
    """Raise CheckpointError listing the network-defining fields in which `spec` differs from the
    checkpoint `state` (its "model_fields"; a checkpoint without them passes)."""
    differ = ["  " + line for line in network_differences(state.get("model_fields"),
                                                          network_fields(spec))]
    if differ:
        raise CheckpointError(
            f"cannot resume from {source}: the spec builds a different network than the one "
            "the checkpoint was trained with:\n" + "\n".join(differ)
            + "\nUse a new results directory for the changed spec, or restore these fields."
        )


@dataclass(frozen=True)
class Resume:
    """Where a run continues: what `resume_or_load` found in a results directory.

    step: the global step training continues from (0: a fresh start). path / state: the
    checkpoint and its contents (None on a fresh start: the spec's pretrained weights are then
    loaded). unevaluated: the checkpoint falls on an evaluation step whose metrics are missing (a
    run stopped between writing it and evaluating it), so it is evaluated before training goes
    on. done: "finished" (the checkpoint is at total_steps), "stopped" (at or past the stop step)
    or None (train). metrics: the recorded metrics of `step`, if any.
    """

    step: int = 0
    path: Path | None = None
    state: dict | None = None
    unevaluated: bool = False
    done: str | None = None
    metrics: dict | None = None

    def message(self, total_steps: int, stop_step: int) -> str:
        """What the run says about where it starts (or why it does nothing)."""
        if self.done == "finished":
            return (f"Training is finished: {self.path} is at step {self.step} of "
                    f"{total_steps}.")
        if self.done == "stopped":
            return f"Stopped: {self.path} is at step {self.step}, max_steps is {stop_step}."
        if self.path is None:
            return f"Training from step 0 of {total_steps}"
        return (f"Resuming from {self.path} at step {self.step} of {total_steps}"
                + (" (evaluating it first: its evaluation is missing)" if self.unevaluated
                   else ""))


def resume_or_load(results_dir: str | os.PathLike, spec: Any, *, total_steps: int,
                   stop_step: int, evaluates: bool) -> Resume:
    """Decide where training in `results_dir` continues: the newest readable checkpoint, or a
    fresh start when there is none.

    evaluates: whether this run evaluates (an evaluation function is given); only then can a
    checkpoint be "unevaluated". Raises CheckpointError when checkpoints exist but none is
    readable, when the newest readable one cannot resume training (an inference weights file), or
    when the spec builds another network than the checkpoint's (listing the fields that differ;
    schedule and data fields may change).
    """
    found = load_latest_checkpoint(results_dir, map_location="cpu")
    if found is None:
        return Resume()
    path, state = found
    require_training_state(state, path)
    check_network(spec, state, path)
    step = int(state["step"])
    metrics = read_metrics(results_dir, step)
    unevaluated = evaluates and is_eval_step(step, spec, total_steps) and metrics is None
    done = None
    if not unevaluated:
        done = "finished" if step >= total_steps else "stopped" if step >= stop_step else None
    return Resume(step, path, state, unevaluated, done, metrics)
