"""Per-channel bias adds in one Triton pass: `x + bias [-> ReLU]`, and the FPN's top-down merge
`lateral + bias + upsample2x(top)`.

PyTorch adds a convolution's bias as a pass of its own after cuDNN's kernel, and on channels_last
tensors that pass is its generic broadcast kernel (about a third of the memory bandwidth: 0.39 ms
for one [8, 256, 208, 336] bf16 map on the H200, `docs/runs/profile_train_h200_where_2026-12-03.txt`);
a following ReLU, nearest upsample or add are further passes over the same map. Here each
composition is one read of the inputs and one write, computed in fp32 and rounded once to the
input's dtype. In the backward, the gradients are the (ReLU-masked) gradient itself, its
per-channel sum and, for the top-down merge, its 2 x 2 sums: the mask and the sum are one
Triton pass over a channels_last gradient (`relu_grad_channel_sum`, also the bias gradient of
fused_conv's conv + bias + ReLU), the 2 x 2 sums another.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
# Launch configurations of the channel sums (tile rows x channels, programs per multiprocessor,
# warps), measured on the H200 (benchmarks/bench_channel_sum.py, 2026-12-04,
# docs/runs/bench_channel_sum_h200_2026-12-04.txt): on maps of 16384 pixels or more the masked
# pass ran fastest with 64 x 128 tiles and 8 warps (P2 at 832x1344: 214 us against 281 us with
# 32 x 64 and 4 warps, 4.0 of the 4.8 TB/s), the plain sum with 128 x 64 tiles (69 us against
# 131); on smaller maps (P5, 8736 pixels) the small tile stays fastest.
SMALL_MAP_ROWS = 16384
SUM_SMALL = (32, 64, 4, 4)
SUM_LARGE_MASKED = (64, 128, 4, 8)
SUM_LARGE = (128, 64, 4, 8)


@triton.jit
def _bias_act(x_ptr, bias_ptr, out_ptr, numel, channels, inner, RELU: tl.constexpr,
              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    c = (offs // inner) % channels
    y = tl.load(x_ptr + offs, mask=inside, other=0).to(tl.float32)
    y += tl.load(bias_ptr + c, mask=inside, other=0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _nhwc_position(offs, channels, height, width):
    """(batch, row, column, channel) of flat offsets into a [B, H, W, C] map."""
    c = offs % channels
    pixel = offs // channels
    w = pixel % width
    row = pixel // width
    return row // height, row % height, w, c


@triton.jit
def _top_down(lateral_ptr, bias_ptr, top_ptr, out_ptr, numel, channels, height, width,
              BLOCK: tl.constexpr):
    """out = lateral + bias + top[h // 2, w // 2], all [B, H, W, C] in memory (top half size)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    b, h, w, c = _nhwc_position(offs, channels, height, width)
    top = ((b * (height // 2) + h // 2) * (width // 2) + w // 2) * channels + c
    y = tl.load(lateral_ptr + offs, mask=inside, other=0).to(tl.float32)
    y += tl.load(bias_ptr + c, mask=inside, other=0).to(tl.float32)
    y += tl.load(top_ptr + top, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sum_2x2(grad_ptr, out_ptr, numel, channels, height, width, stride_b, stride_c, stride_h,
             stride_w, BLOCK: tl.constexpr):
    """out[b, h, w, c] (channels_last, half size) = the sum of grad's 2 x 2 pixels above it
    (grad any strides): the gradient of a nearest 2x upsample."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    b, h, w, c = _nhwc_position(offs, channels, height, width)
    src = grad_ptr + b * stride_b + c * stride_c + 2 * h * stride_h + 2 * w * stride_w
    y = tl.load(src, mask=inside, other=0).to(tl.float32)
    y += tl.load(src + stride_w, mask=inside, other=0).to(tl.float32)
    y += tl.load(src + stride_h, mask=inside, other=0).to(tl.float32)
    y += tl.load(src + stride_h + stride_w, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _masked_channel_sum(grad_ptr, y_ptr, out_ptr, sum_ptr, rows, channels, rows_per_program,
                        MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad (and y) [rows, channels] row-major. MASK: out = grad where y > 0, else 0 (ReLU's
    gradient). sum[c] += the fp32 column sums of (masked) grad over this program's rows."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_inside = c < channels
    start = tl.program_id(0).to(tl.int64) * rows_per_program
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rows_per_program, BLOCK_R):
        r = start + r0 + tl.arange(0, BLOCK_R)
        inside = (r < rows)[:, None] & c_inside[None, :]
        offs = r[:, None] * channels + c[None, :]
        g = tl.load(grad_ptr + offs, mask=inside, other=0)
        if MASK:
            y = tl.load(y_ptr + offs, mask=inside, other=0)
            g = tl.where(y > 0, g, tl.zeros_like(g))
            tl.store(out_ptr + offs, g, mask=inside)
        acc += g.to(tl.float32)
    # Relaxed: the sums only accumulate (one atomic per channel and program).
    tl.atomic_add(sum_ptr + c, tl.sum(acc, axis=0), mask=c_inside, sem="relaxed")


def sum_2x2(grad: Tensor) -> Tensor:
    """[B, C, H/2, W/2] channels_last: each output pixel the sum of grad's 2 x 2 block (H, W
    even). One read of grad: PyTorch's avg_pool2d on channels_last bf16 maps ran at about a
    fifth of the memory bandwidth (0.38 ms for one [8, 256, 208, 336] map, 2026-12-03)."""
    b, c, h, w = grad.shape
    out = torch.empty((b, c, h // 2, w // 2), dtype=grad.dtype, device=grad.device,
                      memory_format=torch.channels_last)
    if out.numel():
        _sum_2x2[(triton.cdiv(out.numel(), BLOCK),)](
            grad, out, out.numel(), c, h // 2, w // 2, *grad.stride(), BLOCK=BLOCK)
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (1 in the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if (
        device.type == "cuda") else 1


def channel_sum_supported(x: Tensor) -> bool:
    """Whether relu_grad_channel_sum / channel_sum take x: a dense channels_last 4-D map."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def sum_config(rows: int, masked: bool) -> tuple[int, int, int, int]:
    """The measured launch configuration (tile rows, tile channels, programs per multiprocessor,
    warps) of the channel sums over `rows` pixels, masked (ReLU gradient) or plain."""
    if rows < SMALL_MAP_ROWS:
        return SUM_SMALL
    return SUM_LARGE_MASKED if masked else SUM_LARGE


def channel_sums(grad: Tensor, y: Tensor | None,
                 config: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(grad masked by y > 0, or grad itself where y is None; its fp32 sum per channel) for
    channels_last grad and y. config: the kernel's launch configuration (tile rows x tile
    channels, powers of two; programs per multiprocessor; warps per program), by default
    sum_config's (benchmarks/bench_channel_sum.py compares them)."""
    channels = grad.shape[1]
    rows = grad.numel() // max(channels, 1)
    block_rows, block_channels, programs_per_sm, num_warps = config or sum_config(
        rows, y is not None)
    out = torch.empty_like(grad) if y is not None else grad
    sums = torch.zeros(channels, dtype=torch.float32, device=grad.device)
    if grad.numel():
        channel_programs = triton.cdiv(channels, block_channels)
        wanted = programs_per_sm * _multiprocessors(grad.device)
        row_programs = max(1, wanted // channel_programs)
        per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_rows) * block_rows
        grid = (triton.cdiv(rows, per_program), channel_programs)
        _masked_channel_sum[grid](grad, grad if y is None else y, out, sums, rows, channels,
                                  per_program, MASK=y is not None, BLOCK_R=block_rows,
                                  BLOCK_C=block_channels, num_warps=num_warps)
    return out, sums


def relu_grad_channel_sum(grad: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(grad where y > 0 else 0, its fp32 sum per channel) in one pass: the gradient through a
    ReLU whose output is y, and the gradient of the bias added before it. y channels_last
    (channel_sum_supported); grad is brought to y's layout."""
    return channel_sums(grad.contiguous(memory_format=torch.channels_last), y)


def channel_sum(grad: Tensor) -> Tensor:
    """grad's fp32 sum per channel (dim 1), channel_sum_supported. PyTorch's sum over dims
    (0, 2, 3) of channels_last bf16 maps ran at about a sixth of the memory bandwidth: 1.9 ms
    of the 38.3 ms training step at 832x1344
    (docs/runs/profile_train_h200_roi_sets_2026-12-03.txt)."""
    return channel_sums(grad, None)[1]


def _layout(x: Tensor) -> int | None:
    """The channel stride's meaning for the kernels: 1 (channels_last), H * W (contiguous NCHW),
    None for any other layout."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    if x.is_contiguous():
        return x[0, 0].numel() if x.dim() > 2 else 1
    return None


def _channel_sum(grad: Tensor, dtype: torch.dtype) -> Tensor:
    if channel_sum_supported(grad):
        return channel_sum(grad).to(dtype)
    dims = [d for d in range(grad.dim()) if d != 1]
    return grad.sum(dims, dtype=torch.float32).to(dtype)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor, relu: bool) -> Tensor:
        out = torch.empty_like(x)
        if x.numel():
            _bias_act[(triton.cdiv(x.numel(), BLOCK),)](
                x, bias.contiguous(), out, x.numel(), x.shape[1], _layout(x), RELU=relu,
                BLOCK=BLOCK)
        ctx.relu = relu
        ctx.bias_dtype = bias.dtype
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        need_bias = ctx.needs_input_grad[1]
        if ctx.relu:
            (out,) = ctx.saved_tensors
            if need_bias and channel_sum_supported(out):
                grad, sums = relu_grad_channel_sum(grad, out)
                return grad, sums.to(ctx.bias_dtype), None
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        return grad, _channel_sum(grad, ctx.bias_dtype) if need_bias else None, None


class _TopDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lateral: Tensor, bias: Tensor, top: Tensor) -> Tensor:
        out = torch.empty_like(lateral)
        if lateral.numel():
            _top_down[(triton.cdiv(lateral.numel(), BLOCK),)](
                lateral, bias.contiguous(), top, out, lateral.numel(), lateral.shape[1],
                lateral.shape[2], lateral.shape[3], BLOCK=BLOCK)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The gradient of a nearest 2x upsample: each top pixel's four copies summed.
        bias_grad = _channel_sum(grad, ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad, bias_grad, sum_2x2(grad) if ctx.needs_input_grad[2] else None


def bias_act_supported(x: Tensor, bias: Tensor) -> bool:
    """Whether bias_act_triton takes x (a dense NCHW or channels_last layout, bias [C])."""
    return x.dim() >= 2 and bias.shape == (x.shape[1],) and _layout(x) is not None


def bias_act_triton(x: Tensor, bias: Tensor, relu: bool) -> Tensor:
    """x + bias (per channel, dim 1) [then ReLU], in x's dtype and layout; bias_act_supported."""
    return _BiasAct.apply(x, bias, relu)


def top_down_supported(lateral: Tensor, bias: Tensor, top: Tensor) -> bool:
    """Whether top_down_triton takes these: both channels_last 4-D maps of one dtype, lateral
    exactly twice top's height and width, bias [C]."""
    cl = torch.channels_last
    return (lateral.dim() == 4 and top.dim() == 4 and lateral.dtype == top.dtype
            and lateral.shape[:2] == top.shape[:2] and bias.shape == (lateral.shape[1],)
            and lateral.shape[2] == 2 * top.shape[2] and lateral.shape[3] == 2 * top.shape[3]
            and lateral.is_contiguous(memory_format=cl) and top.is_contiguous(memory_format=cl))


def top_down_triton(lateral: Tensor, bias: Tensor, top: Tensor) -> Tensor:
    """lateral + bias + nearest-upsampled top (channels_last); top_down_supported."""
    return _TopDown.apply(lateral, bias, top)
