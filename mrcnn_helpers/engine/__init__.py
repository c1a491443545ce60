"""Training engine: LR schedule, checkpoints and resume, logging, the training loop.

    from mrcnn_helpers.engine import train
    result = train(spec, "results/run1")      # -> {"step", "checkpoint", "metrics"}
"""

from mrcnn_helpers.engine.checkpoint import (
    CheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from mrcnn_helpers.engine.logging import MetricLogger
from mrcnn_helpers.engine.optim import build_optimizer, l2_loss_of
from mrcnn_helpers.engine.schedule import learning_rate_at
from mrcnn_helpers.engine.trainer import train

__all__ = [
    "CheckpointWarning",
    "MetricLogger",
    "build_optimizer",
    "l2_loss_of",
    "latest_checkpoint",
    "learning_rate_at",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "train",
]
