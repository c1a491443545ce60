"""A ResNet stage of folded blocks (frozen BN folded into the convolutions) as one autograd node,
so that the residual branches' gradients are added inside the ReLU-gradient pass.

Run block by block, each block's input x feeds its first convolution and its identity branch,
and autograd adds the two gradients of x (a pass that reads two maps and writes one) before the
previous block's backward masks that sum by its ReLU (a second pass). In the training step at
832x1344 those additions took 0.9 ms (docs/runs/profile_train_h200_roi_sets_2026-12-03.txt).
Here the stage's backward keeps the two gradients apart and masks their sum in one Triton pass
(kernels/residual.relu_grad_of_sum); the convolutions' forward and data / weight gradients are
exactly those of fused_conv (cuDNN's fused conv + bias + ReLU (+ add), aten's
convolution_backward). Frozen BN means no bias trains, so the backward computes no bias sums.

On by default in training on CUDA with channels_last maps (MRCNN_FUSED_STAGE=0 runs the blocks
one by one): on the H200 the training step at 832x1344 went from 36.1 to 35.8 ms, and its bf16
gradients were as far from the fp32 step's as the block-by-block path's (mean relative error
5.24e-2 for both; benchmarks/check_cuda.py, 2026-12-04,
docs/runs/bench_h200_train_variants_2026-12-04.txt, check_cuda_h200_2026-12-04.txt).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_conv, kernels

if kernels.ENABLED:
    from .kernels.residual import relu_grad_of_sum

ENABLED = os.environ.get("MRCNN_FUSED_STAGE", "1") != "0"


def _conf(conv: nn.Conv2d) -> tuple:
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _relu_grad(a: Tensor, b: Tensor | None, y: Tensor) -> Tensor:
    """(a [+ b]) where y > 0, else 0: the gradient through the ReLU whose output is y."""
    cl = torch.channels_last
    if b is not None and kernels.available(y) and y.is_contiguous(memory_format=cl):
        return relu_grad_of_sum(a, b, y)
    return fused_conv.relu_backward(a if b is None else a + b, y)


def _conv_backward(g: Tensor, x: Tensor, weight: Tensor, conf, need_x: bool, need_w: bool):
    if not (need_x or need_w):
        return None, None
    stride, padding, dilation, groups = conf
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, list(stride), list(padding), list(dilation), False,
        [0] * len(stride), groups, [need_x, need_w, False])
    return gx, gw


class _Stage(torch.autograd.Function):
    """forward(x, plan, *weights): plan is one entry per block, (convs, downsample), each conv
    (weight index, bias, conf, module) and downsample None or such a tuple; weights are the
    folded weights in the compute dtype (autograd inputs), biases constants."""

    @staticmethod
    def forward(ctx, x, plan, *weights):
        saved = [x]
        for convs, downsample in plan:
            block_in = y = x
            for index, (w, bias, conf, module) in enumerate(convs):
                residual = None
                if index == len(convs) - 1:  # the last convolution adds the identity branch
                    residual = block_in
                    if downsample is not None:
                        wd, bias_d, conf_d, _ = downsample
                        residual = F.conv2d(block_in, weights[wd], None, *conf_d)
                        bias = bias + bias_d
                y = fused_conv.conv_bias_relu_where_possible(module, y, weights[w], bias,
                                                             residual, conf, autograd=False)
                saved.append(y)
            x = y
        ctx.save_for_backward(*saved, *weights)
        ctx.plan, ctx.num_saved = plan, len(saved)
        return x

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        maps, weights = saved[:ctx.num_saved], saved[ctx.num_saved:]
        need_w = ctx.needs_input_grad[2:]
        grads = [None] * len(weights)
        a, b = grad, None  # the gradient of the current block's output, in two parts
        position = ctx.num_saved - 1
        for block, (convs, downsample) in reversed(list(enumerate(ctx.plan))):
            block_maps = maps[position - len(convs):position + 1]  # block input, conv outputs
            position -= len(convs)
            need_in = block > 0 or ctx.needs_input_grad[0]
            g = _relu_grad(a, b, block_maps[-1])
            identity = g
            if downsample is not None:
                wd, _, conf_d, _ = downsample
                identity, grads[wd] = _conv_backward(g, block_maps[0], weights[wd], conf_d,
                                                     need_in, need_w[wd])
            for index in range(len(convs) - 1, -1, -1):
                w, _, conf, _ = convs[index]
                need_x = index > 0 or need_in
                gx, grads[w] = _conv_backward(g, block_maps[index], weights[w], conf, need_x,
                                              need_w[w])
                g = _relu_grad(gx, None, block_maps[index]) if index > 0 else gx
            a, b = g, identity
        grad_x = a + b if ctx.needs_input_grad[0] and a is not None else None
        return (grad_x, None, *grads)


def applies(stage: nn.Module, x: Tensor) -> bool:
    """Whether `stage` (a ResNet layer of folded blocks, backbone.stage_is_folded) runs as one
    node: switched on, gradients wanted (of x or of the stage's weights), and the Triton
    kernels and fused convolutions serve x (channels_last)."""
    if not (ENABLED and torch.is_grad_enabled() and kernels.available(x)
            and (fused_conv.ENABLED or not x.is_cuda)
            and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    # A frozen stage on an input without gradient has no backward: run it block by block.
    return x.requires_grad or any(p.requires_grad for p in stage.parameters())


def block_convs(block: nn.Module) -> list[nn.Module]:
    """A ResNet block's convolutions: conv1..conv3, then the downsample's, if any."""
    convs = [getattr(block, f"conv{k}") for k in (1, 2, 3) if hasattr(block, f"conv{k}")]
    return convs + ([block.downsample[0]] if block.downsample is not None else [])


def stage_forward(stage: nn.Module, x: Tensor) -> Tensor:
    """The stage's output (as `stage(x)` computes it), as one autograd node (`applies`); its
    convolutions are backbone.ConvWithFrozenBN (their `_weights` give the folded weights)."""
    weights, plan = [], []

    def add(conv, for_x):
        weight, bias = conv._weights(for_x)
        if bias.requires_grad:
            raise ValueError("fused_stage: a folded bias must not train")
        weights.append(weight)
        return len(weights) - 1, bias.detach(), _conf(conv), conv

    for block in stage:
        convs = [add(conv, x) for conv in block_convs(block)]
        downsample = convs.pop() if block.downsample is not None else None
        plan.append((convs, downsample))
    dtype = weights[0].dtype
    return _Stage.apply(x.to(dtype), plan, *weights)
