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
# The trainable convolutions' folded weights computed together (fold_weights): opt-in with
# MRCNN_BATCHED_FOLD=1 until its speed has been measured on the GPU machine.
BATCHED_FOLD = os.environ.get("MRCNN_BATCHED_FOLD", "0") == "1"


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


def _memory_order(t: Tensor) -> list[int]:
    """t's dimensions from the largest stride to the smallest (ties keep their order): permuted
    so, a dense t is contiguous (channels_last [K, C, kh, kw] -> [K, kh, kw, C])."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _flat(t: Tensor, order: list[int]) -> Tensor:
    return t.permute(order).reshape(-1)


def _unflat(flat: Tensor, likes: list[tuple[torch.Size, list[int]]]) -> list[Tensor]:
    """Views of flat shaped and strided as the tensors `likes` describes (shape, memory order)."""
    out, start = [], 0
    for shape, order in likes:
        n = shape.numel()
        view = flat[start:start + n].view([shape[d] for d in order])
        out.append(view.permute(sorted(range(len(order)), key=order.__getitem__)))
        start += n
    return out


class _FoldWeights(torch.autograd.Function):
    """forward(scale, dtype, *weights): each weight times its frozen-BN scale per output
    channel, in dtype, as one multiplication over the weights' concatenation (scale: the
    per-element scales of that concatenation, fp32). Forward and backward are two kernels each
    (a concatenation, a multiplication) instead of two per convolution (the product, the
    cast; their backward: the cast back, the product). The values are the per-convolution
    path's exactly: the product in fp32, rounded once to dtype; its gradient in fp32. The
    outputs and the weights' gradients keep each weight's layout (channels_last)."""

    @staticmethod
    def forward(ctx, scale, dtype, *weights):
        likes = [(w.shape, _memory_order(w)) for w in weights]
        flat = torch.cat([_flat(w, order) for w, (_, order) in zip(weights, likes)])
        out = torch.empty(flat.shape, dtype=dtype, device=flat.device)
        torch.mul(flat, scale, out=out)
        ctx.save_for_backward(scale)
        ctx.likes = likes
        return tuple(_unflat(out, likes))

    @staticmethod
    def backward(ctx, *grads):
        (scale,) = ctx.saved_tensors
        flat = torch.cat([_flat(g, order) if g is not None else scale.new_zeros(shape.numel())
                          for g, (shape, order) in zip(grads, ctx.likes)])
        # bf16 gradients times the fp32 scales: promoted, the products and result in fp32
        return (None, None, *_unflat(flat * scale, ctx.likes))


def _fold_scale(stage: nn.Module, convs: list[nn.Module], dtype: torch.dtype) -> Tensor:
    """The per-element frozen-BN scales of the convolutions' concatenated weights (in their
    memory order, the output channel first), kept on the stage while the BN tensors, the
    weights' storage and layouts stay the same."""
    key = tuple(conv._bn_key(dtype) + (conv.weight.data_ptr(), conv.weight.stride())
                for conv in convs)
    cache = stage.__dict__.get("_fold_scale_cache")
    if cache is None or cache[0] != key:
        parts = []
        for conv in convs:
            if _memory_order(conv.weight)[0] != 0:
                raise ValueError("fused_stage: a weight's output channels must be outermost")
            scale = conv._scale_shift(dtype)[0].view(-1)
            parts.append(scale.repeat_interleave(conv.weight[0].numel()))
        cache = stage.__dict__["_fold_scale_cache"] = (key, torch.cat(parts))
    return cache[1]


def fold_weights(stage: nn.Module, convs: list[nn.Module], dtype: torch.dtype) -> list[Tensor]:
    """The folded weights of trainable ConvWithFrozenBN convolutions of a stage (what each
    one's `_weights` gives), through autograd, computed together (_FoldWeights)."""
    scale = _fold_scale(stage, convs, dtype)
    return list(_FoldWeights.apply(scale, dtype, *[conv.weight for conv in convs]))


def stage_forward(stage: nn.Module, x: Tensor) -> Tensor:
    """The stage's output (as `stage(x)` computes it), as one autograd node (`applies`); its
    convolutions are backbone.ConvWithFrozenBN (their `_weights` give the folded weights, or,
    with BATCHED_FOLD, fold_weights for the trainable ones together)."""
    folded = {}
    trainable = [conv for block in stage for conv in block_convs(block)
                 if conv.weight.requires_grad]
    if BATCHED_FOLD and trainable and torch.is_grad_enabled():
        dtype = fused_conv.compute_dtype(x, trainable[0].weight)
        folded = dict(zip(trainable, fold_weights(stage, trainable, dtype)))
    weights, plan = [], []

    def add(conv, for_x):
        if conv in folded:
            weight, bias = folded[conv], conv._scale_shift(folded[conv].dtype)[1]
        else:
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
