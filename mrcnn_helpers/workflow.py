"""The workflow's steps with their defaults wired together, as the CLI and notebooks use them.

The engine trains with whatever evaluation it is given (it sits below evaluation in the layers:
spec -> data / model -> engine -> inference -> evaluate / export / deploy). Here training gets
its default: COCO box and mask metrics of the validation split at every `num_steps_per_eval`.

    from mrcnn_helpers import train
    result = train(spec, "results/run1")      # -> {"step", "checkpoint", "metrics"}
"""

from __future__ import annotations

from mrcnn_helpers import engine
from mrcnn_helpers.evaluate import evaluate_model


def train(spec, results_dir, *, evaluate_fn=evaluate_model, **kwargs) -> dict:
    """engine.train with COCO evaluation (evaluate.evaluate_model) unless evaluate_fn says
    otherwise (None: no evaluation during training). Other arguments as engine.train."""
    return engine.train(spec, results_dir, evaluate_fn=evaluate_fn, **kwargs)
