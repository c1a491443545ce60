"""Bias adds after a convolution, fused with what follows them: `bias_act` (+ ReLU),
`top_down_add` (the FPN's merge of a lateral map with the upsampled coarser level) and
`bias_relu_maxpool` (the ResNet stem's bias, ReLU and max pool).

On CUDA with Triton each is one pass (model/kernels/bias.py says why that matters); elsewhere,
and for layouts the kernels do not take, the PyTorch composition they replace, so CPU results,
tests and ONNX export see plain operators.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

if kernels.ENABLED:
    from .kernels.bias import (
        bias_act_supported,
        bias_act_triton,
        top_down_supported,
        top_down_triton,
    )
    from .kernels.pool import bias_relu_maxpool_supported, bias_relu_maxpool_triton

# The stem's bias + ReLU + max pool as one pass where no gradient is needed (kernels/pool.py):
# opt-in with MRCNN_STEM_POOL=1 until its speed has been measured on the GPU machine.
STEM_POOL = os.environ.get("MRCNN_STEM_POOL", "0") == "1"


def bias_act(x: Tensor, bias: Tensor, relu: bool = False) -> Tensor:
    """x + bias (one value per channel, dim 1) [then ReLU], in x's dtype."""
    if kernels.available(x) and bias_act_supported(x, bias):
        return bias_act_triton(x, bias, relu)
    y = x + bias.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    return F.relu(y) if relu else y


def top_down_add(lateral: Tensor, bias: Tensor, top: Tensor) -> Tensor:
    """lateral + bias + top upsampled (nearest) to lateral's size: the FPN's top-down merge,
    for lateral the bias-free output of its 1 x 1 convolution."""
    if kernels.available(lateral) and top_down_supported(lateral, bias, top):
        return top_down_triton(lateral, bias, top)
    return bias_act(lateral, bias) + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")


def conv_without_bias(conv: nn.Conv2d | nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """The convolution `conv` computes, without adding its bias."""
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, conv.weight, None, conv.stride, conv.padding,
                                  conv.output_padding, conv.groups, conv.dilation)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bias_act(conv: nn.Conv2d | nn.ConvTranspose2d, x: Tensor, relu: bool = False) -> Tensor:
    """relu?(conv(x)) with the bias added by bias_act (no bias: the convolution alone)."""
    out = conv_without_bias(conv, x)
    if conv.bias is None:
        return F.relu(out) if relu else out
    return bias_act(out, conv.bias, relu)


def _is_stem_pool(pool: nn.Module) -> bool:
    return (isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (3, (3, 3))
            and pool.stride in (2, (2, 2)) and pool.padding in (1, (1, 1))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices)


def bias_relu_maxpool(x: Tensor, bias: Tensor, pool: nn.Module) -> Tensor:
    """pool(relu(x + bias)): one pass (kernels/pool.py) where STEM_POOL is on, pool is the
    stem's 3 x 3 stride-2 max pool and no gradient is needed; else bias_act, then pool."""
    if (STEM_POOL and kernels.available(x) and _is_stem_pool(pool)
            and not (torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad))
            and bias_relu_maxpool_supported(x, bias)):
        return bias_relu_maxpool_triton(x, bias)
    return pool(bias_act(x, bias, relu=True))
