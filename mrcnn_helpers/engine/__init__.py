"""Training engine: the loop and its hooks, LR schedule, checkpoints and resume, logging.

    from mrcnn_helpers.engine import train
    result = train(spec, "results/run1", evaluate_fn=my_eval)  # {"step", "checkpoint", "metrics"}

The engine evaluates only through `evaluate_fn` (it imports no evaluation, inference, export or
notebook code); `mrcnn_helpers.train` wires in COCO evaluation.
"""

from mrcnn_helpers.engine.checkpoint import (
    CheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_inference_weights,
)
from mrcnn_helpers.engine.hooks import HookBase
from mrcnn_helpers.engine.loop import Trainer
from mrcnn_helpers.engine.metric_logger import MetricLogger
from mrcnn_helpers.engine.optim import build_optimizer, l2_loss_of
from mrcnn_helpers.engine.resume import resume_or_load
from mrcnn_helpers.engine.schedule import learning_rate_at
from mrcnn_helpers.engine.trainer import train

__all__ = [
    "CheckpointWarning",
    "HookBase",
    "MetricLogger",
    "Trainer",
    "build_optimizer",
    "l2_loss_of",
    "latest_checkpoint",
    "learning_rate_at",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "resume_or_load",
    "save_checkpoint",
    "save_inference_weights",
    "train",
]
