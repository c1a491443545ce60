"""SGD with momentum and decoupled-from-biases weight decay, and TLT's reported L2 loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters of `model`.

    Weight decay applies to conv and linear weights (tensors of 2+ dims) only. Biases and
    normalization scales/shifts (1-D) are left alone: they do not grow the model's capacity the
    way weights do, shrinking a norm layer's scale towards 0 fights the normalization itself, and
    TLT's L2 loss likewise skips batch-norm and bias variables. Frozen parameters
    (requires_grad=False, e.g. freeze_blocks) are not given to the optimizer at all.
    """
    decayed, plain = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decayed if param.ndim > 1 else plain).append(param)
    return decayed, plain


def build_optimizer(model: nn.Module, spec: Any) -> tuple[torch.optim.SGD, list[nn.Parameter]]:
    """SGD(momentum=spec.momentum) with weight_decay=spec.l2_weight_decay on weights only.

    Returns (optimizer, decayed parameters). The learning rate is set by the trainer before every
    step from `learning_rate_at`, so the initial value here is a placeholder.
    """
    decayed, plain = split_decay_parameters(model)
    if not decayed and not plain:
        raise ValueError("the model has no trainable parameters (all frozen?)")
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": float(spec.l2_weight_decay)})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(groups, lr=float(spec.init_learning_rate),
                                momentum=float(spec.momentum))
    return optimizer, decayed


@torch.no_grad()
def l2_loss_of(decayed: list[nn.Parameter], l2_weight_decay: float) -> float:
    """TLT's "L2 loss": l2_weight_decay * 0.5 * sum(w**2) over the decayed weights.

    Only reported, never back-propagated: its gradient, l2_weight_decay * w, is exactly what SGD's
    weight_decay adds to each decayed weight's gradient, so optimizing it through the optimizer
    is the same update without an extra pass over all weights in the graph.
    """
    if not decayed:
        return 0.0
    total = torch.stack([p.detach().float().pow(2).sum() for p in decayed]).sum()
    return float(l2_weight_decay) * 0.5 * float(total)
