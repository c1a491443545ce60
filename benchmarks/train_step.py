"""The training step the benchmarks time: the trainer's own (engine.graphed_step after its
eager warm-up, or the eager step alone), SGD with momentum, bf16 autocast, losses on the device.
"""

from __future__ import annotations

import torch

from mrcnn_helpers.engine.graphed_step import GraphedTrainStep
from mrcnn_helpers.engine.loop import LossMeter


def make_train_step(model, device, *, graphs: bool = True):
    """(step(images, targets, lr), meter): one SGD update per call, as `mrcnn train` runs it."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0,
                          momentum=0.9)
    meter = LossMeter(device, 0)

    def eager(images, targets, lr):
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(images, targets)
        meter.add(losses)
        opt.zero_grad(set_to_none=True)
        sum(losses[k].float() for k in sorted(losses)).backward()
        opt.step()

    if not graphs:
        return eager, meter
    return GraphedTrainStep(model=model, amp_dtype=torch.bfloat16, optimizer=opt, meter=meter,
                            eager_step=eager, device=device, note=lambda text: None), meter
