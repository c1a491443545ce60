"""Translucent masks blended into video frames in one Triton pass (deploy.overlay's blend).

Each program takes a block of pixels of one frame and walks that frame's instances best first:
where instance j is drawn and covers the pixel, it adds color_j * alpha * (1 - alpha)^k (k: the
better drawn masks over the pixel so far) and multiplies the pixel's own weight by (1 - alpha).
The frame is then pixel * weight + sum, rounded half to even and written as bytes. That is the
host's worst-first `out = out * (1 - a) + color * a` unrolled (deploy/overlay.py says why it is
exact for alpha 0.5). Masks are read once, as bytes; nothing of size [N, pixels] is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _blend_channel(frame_ptrs, out_ptrs, weight, acc, inside):
    pixel = tl.load(frame_ptrs, mask=inside, other=0).to(tl.float32)
    value = pixel * weight + acc
    # rounded half to even, as numpy's rint and torch.round
    rounded = tl.floor(value + 0.5)
    odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
    value = tl.where(((rounded - value) == 0.5) & odd, rounded - 1.0, rounded)
    value = tl.minimum(tl.maximum(value, 0.0), 255.0)
    tl.store(out_ptrs, value.to(tl.uint8), mask=inside)


@triton.jit
def _composite(frames_ptr, masks_ptr, drawn_ptr, colors_ptr, out_ptr, pixels, n, alpha,
               BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < pixels
    weight = tl.full((BLOCK,), 1.0, tl.float32)
    acc_r = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
    frame_masks = masks_ptr + b.to(tl.int64) * n * pixels
    for j in range(n):
        if tl.load(drawn_ptr + b * n + j) != 0:
            m = tl.load(frame_masks + j * pixels + offs, mask=inside, other=0) != 0
            share = tl.where(m, weight * alpha, 0.0)
            acc_r += share * tl.load(colors_ptr + (b * n + j) * 3 + 0)
            acc_g += share * tl.load(colors_ptr + (b * n + j) * 3 + 1)
            acc_b += share * tl.load(colors_ptr + (b * n + j) * 3 + 2)
            weight = tl.where(m, weight * (1.0 - alpha), weight)
    base = b.to(tl.int64) * pixels * 3 + offs * 3
    _blend_channel(frames_ptr + base, out_ptr + base, weight, acc_r, inside)
    _blend_channel(frames_ptr + base + 1, out_ptr + base + 1, weight, acc_g, inside)
    _blend_channel(frames_ptr + base + 2, out_ptr + base + 2, weight, acc_b, inside)


def composite_frames(frames: Tensor, masks: Tensor, drawn: Tensor, colors: Tensor,
                     alpha: float) -> Tensor:
    """uint8 [B, h, w, 3]: frames uint8 [B, h, w, 3] with masks bool [B, N, h, w] blended in
    where drawn bool [B, N] (index 0 best, drawn on top) in colors float32 [B, N, 3]."""
    batch, n = int(masks.shape[0]), int(masks.shape[1])
    h, w = int(frames.shape[1]), int(frames.shape[2])
    out = torch.empty_like(frames)
    if batch and h * w:
        block = 1024
        _composite[(batch, triton.cdiv(h * w, block))](
            frames.contiguous(), masks.contiguous().view(torch.uint8), drawn.to(torch.uint8),
            colors.float().contiguous(), out, h * w, n, float(alpha), BLOCK=block)
    return out
