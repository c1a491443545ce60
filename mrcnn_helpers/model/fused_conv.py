"""relu(conv(x, weight) + bias [+ residual]) as one cuDNN kernel, in training as at inference.

PyTorch runs a convolution with bias as the convolution and then a broadcast add of the bias, and
the residual add and the ReLU as passes of their own: three reads and writes of every activation
after the convolution, on the largest tensors of the network (on channels_last tensors the bias
add is PyTorch's generic, non-vectorized broadcast kernel: 8.4 ms of a 57 ms training step at
832x1344 on the H200, docs/runs/profile_train_h200.txt). cuDNN has fused engines for
conv + bias (+ add) + ReLU (`torch.cudnn_convolution_relu`, `torch.cudnn_convolution_add_relu`),
which PyTorch exposes without autograd; `conv_bias_relu` gives them one:

- forward: the fused kernel on CUDA (the reference composition on the CPU, for tests);
- backward: ReLU's mask from the saved output (what autograd would do for torch.relu), then
  cuDNN's data and weight gradients (`aten.convolution_backward`), the bias gradient as the sum
  of the masked gradient, and the residual's gradient as the masked gradient itself. Where the
  bias trains and the Triton kernels serve the (channels_last) output, the mask and the bias sum
  are one pass (kernels/bias.relu_grad_channel_sum), not a mask pass and a sum pass.

So the backward is the one autograd runs for the unfused composition, and the forward loses its
separate passes. The ResNet blocks use it (backbone.py), and so do the RPN head's and the mask
head's conv + ReLU layers (`fuse_conv_relu_layers`). MRCNN_FUSED_CONV=0 turns it all off
(benchmarks/bench_conv_fusion.py and bench_maskrcnn.py compare).
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from . import kernels

if kernels.ENABLED:
    from .kernels.bias import channel_sum_supported, relu_grad_channel_sum

ENABLED = os.environ.get("MRCNN_FUSED_CONV", "1") != "0"


class NoFusedEngine(RuntimeError):
    """cuDNN has no fused engine for this convolution (e.g. a 3-channel input)."""


def unfused(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, conf) -> Tensor:
    """The composition the fused kernel computes: conv2d, [+ residual], ReLU."""
    out = F.conv2d(x, weight, bias, *conf)
    return torch.relu(out if residual is None else out + residual)


def fused_forward(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None,
                  conf) -> Tensor:
    """The fused kernel's output, without autograd (the composition on the CPU); raises
    NoFusedEngine where cuDNN has none for this convolution."""
    if not x.is_cuda:
        return unfused(x, weight, bias, residual, conf)
    try:
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *conf)
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, *conf)
    except RuntimeError as exc:  # "unable to find an engine"
        raise NoFusedEngine(str(exc)) from exc


class _ConvBiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, groups):
        conf = (stride, padding, dilation, groups)
        y = fused_forward(x, weight, bias, residual, conf)
        ctx.save_for_backward(x, weight, y)
        ctx.conf = conf
        ctx.bias_size, ctx.bias_dtype = bias.shape[0], bias.dtype
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        if need_b and kernels.available(y) and channel_sum_supported(y):
            g, gb = relu_grad_channel_sum(grad, y)
            gb, need_b = gb.to(ctx.bias_dtype), False  # cuDNN's backward need not sum it
        else:
            g = relu_backward(grad, y)
        if need_x or need_w or need_b:
            gx, gw, gb_conv = torch.ops.aten.convolution_backward(
                g, x, weight, [ctx.bias_size] if need_b else None, list(stride), list(padding),
                list(dilation), False, [0] * len(stride), groups, [need_x, need_w, need_b])
            if need_b:
                gb = gb_conv
        gr = g if ctx.has_residual and need_r else None
        return gx, gw, gb, gr, None, None, None, None


def conv_bias_relu(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None = None,
                   stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> Tensor:
    """relu(conv2d(x, weight, bias, ...) [+ residual]), one cuDNN kernel on CUDA.

    All tensors must share x's dtype (the caller casts under autocast). Raises NoFusedEngine where
    cuDNN has no fused engine for the convolution; nothing has been computed then."""
    return _ConvBiasReLU.apply(x, weight, bias, residual, tuple(stride), tuple(padding),
                               tuple(dilation), groups)


def conv_bias_relu_where_possible(owner: nn.Module, x: Tensor, weight: Tensor, bias: Tensor,
                                  residual: Tensor | None, conf, autograd: bool = True) -> Tensor:
    """conv_bias_relu (fused_forward where `autograd` is False: a caller that writes its own
    backward), or the unfused composition for a convolution (`owner`) that cuDNN was found to
    have no fused engine for. That is learnt at the first, eager call: a CUDA graph capture
    replays whichever path that call took."""
    if not owner.__dict__.get("_no_fused_engine", False):
        try:
            if autograd:
                return conv_bias_relu(x, weight, bias, residual, *conf)
            return fused_forward(x, weight, bias, residual, conf)
        except NoFusedEngine:
            owner.__dict__["_no_fused_engine"] = True
    return unfused(x, weight, bias, residual, conf)


def relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    """grad where y > 0, else 0 (the gradient through a ReLU whose output is y), in y's layout."""
    memory_format = (torch.channels_last if y.is_contiguous(memory_format=torch.channels_last)
                     and not y.is_contiguous() else torch.contiguous_format)
    return torch.ops.aten.threshold_backward(grad.contiguous(memory_format=memory_format), y, 0)


def enabled_for(x: Tensor) -> bool:
    """Whether the fused kernels serve this input: on CUDA, unless MRCNN_FUSED_CONV=0."""
    return ENABLED and x.is_cuda


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a convolution of x runs in: autocast's where it is on, else the weight's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class ConvReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation without a norm layer (conv with bias, ReLU), whose
    forward is one fused kernel on CUDA (same modules, so the same state_dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        if not enabled_for(x):
            return super().forward(x)
        conv = self[0]
        dtype = compute_dtype(x, conv.weight)
        return conv_bias_relu_where_possible(
            self, x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), None,
            (conv.stride, conv.padding, conv.dilation, conv.groups))


def fuse_conv_relu_layers(module: nn.Module) -> int:
    """Turn every conv (with bias) + ReLU Conv2dNormActivation inside `module` into a ConvReLU,
    in place (torchvision's RPNHead and MaskRCNNHeads are made of them); returns how many."""
    count = 0
    for m in module.modules():
        if (type(m) is Conv2dNormActivation and len(m) == 2 and type(m[0]) is nn.Conv2d
                and m[0].bias is not None and type(m[1]) is nn.ReLU
                and isinstance(m[0].padding, tuple)):
            m.__class__ = ConvReLU
            count += 1
    return count
