"""The ResNet stem's bias + ReLU + 3 x 3 stride-2 max pool (padding 1) as one Triton pass over a
channels_last map, where nothing needs its gradient (a frozen stem).

PyTorch runs them as two passes, and its CUDA max pool always writes the int64 indices of the
maxima too (for a backward that a frozen stem never runs): at 832x1344, batch 8, the pool of the
[8, 64, 416, 672] bf16 map took 0.58 ms per training step on the H200, about four times its
reads and writes at the memory bandwidth
(docs/runs/profile_train_h200_channel_sum_2026-12-04.txt), and the bias + ReLU pass before it
another full read and write of that map. Here each output pixel takes the maximum of its window
of conv outputs, then adds the bias and applies the ReLU: the same values, since rounding to the
map's dtype and the ReLU are monotone (max(relu(x + b)) == relu(max(x) + b), exactly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_PIXELS = 32


@triton.jit
def _bias_relu_maxpool(x_ptr, bias_ptr, out_ptr, pixels, height, width, out_h, out_w, channels,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    p_in = p < pixels
    c_in = c < channels
    wo = p % out_w
    ho = (p // out_w) % out_h
    b = p // (out_w * out_h)
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    for dy in tl.static_range(3):
        ih = ho * 2 - 1 + dy
        for dx in tl.static_range(3):
            iw = wo * 2 - 1 + dx
            ok = p_in & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            offs = ((b * height + ih) * width + iw) * channels
            v = tl.load(x_ptr + offs[:, None] + c[None, :], mask=ok[:, None] & c_in[None, :],
                        other=float("-inf"))
            best = tl.maximum(best, v.to(tl.float32))
    y = tl.maximum(best + tl.load(bias_ptr + c, mask=c_in, other=0).to(tl.float32)[None, :], 0.0)
    tl.store(out_ptr + p[:, None] * channels + c[None, :], y.to(out_ptr.dtype.element_ty),
             mask=p_in[:, None] & c_in[None, :])


def bias_relu_maxpool_supported(x: Tensor, bias: Tensor) -> bool:
    """Whether bias_relu_maxpool takes x: a dense channels_last 4-D map, bias [C], at most 256
    channels (one program holds all of a pixel's channels)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and bias.shape == (x.shape[1],) and 0 < x.shape[1] <= 256)


def bias_relu_maxpool_triton(x: Tensor, bias: Tensor) -> Tensor:
    """max_pool2d(relu(x + bias), 3, stride 2, padding 1) in x's dtype, channels_last; no
    autograd (bias_relu_maxpool_supported)."""
    bsz, channels, height, width = x.shape
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    out = torch.empty((bsz, channels, out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    pixels = bsz * out_h * out_w
    if pixels:
        _bias_relu_maxpool[(triton.cdiv(pixels, BLOCK_PIXELS),)](
            x, bias, out, pixels, height, width, out_h, out_w, channels, BLOCK_P=BLOCK_PIXELS,
            BLOCK_C=triton.next_power_of_2(channels))
    return out
