"""Bias adds after a convolution, fused with what follows them: `bias_act` (+ ReLU) and
`top_down_add` (the FPN's merge of a lateral map with the upsampled coarser level).

On CUDA with Triton each is one pass (model/kernels/bias.py says why that matters); elsewhere,
and for layouts the kernels do not take, the PyTorch composition they replace, so CPU results,
tests and ONNX export see plain operators.
"""

from __future__ import annotations

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
