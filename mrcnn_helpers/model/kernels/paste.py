"""Masks pasted into the image and thresholded in one Triton pass, written straight as bytes.

The same sampling as model/masks.py's paste_masks_in_image (each pixel centre inside a box takes
the bilinear sample of its R x R mask, cells beyond the mask count as 0), then `>= threshold`.
Pasting 100 masks per image at 832 x 1344 with matrix products writes fp32 probabilities (3.6 GB
per batch of 8) only to threshold them; here each output pixel is computed from at most four
mask cells and stored as one byte, and pixels outside the box are written as 0 without reading
the mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _axis(pos, start, size, R: tl.constexpr):
    """Cell index r0 and weights of r0 / r0 + 1 for pixel centres `pos` (R cells across `size`)."""
    u = ((pos.to(tl.float32) + 0.5) - start) / size * R - 0.5
    inside = (u >= -0.5) & (u <= R - 0.5)
    r0f = tl.floor(u)
    frac = u - r0f
    r0 = r0f.to(tl.int32)
    return r0, 1.0 - frac, frac, inside


@triton.jit
def _paste_binary(masks_ptr, boxes_ptr, out_ptr, height, width, threshold,
                  R: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    x1 = tl.load(boxes_ptr + n * 4 + 0)
    y1 = tl.load(boxes_ptr + n * 4 + 1)
    x2 = tl.load(boxes_ptr + n * 4 + 2)
    y2 = tl.load(boxes_ptr + n * 4 + 3)
    bw = tl.maximum(x2 - x1, 1e-3)
    bh = tl.maximum(y2 - y1, 1e-3)
    ry, wy0, wy1, in_y = _axis(rows, y1, bh, R)
    base = masks_ptr + n.to(tl.int64) * R * R
    out_rows = out_ptr + n.to(tl.int64) * height * width + rows[:, None].to(tl.int64) * width
    for col0 in range(0, width, BLOCK_X):
        cols = col0 + tl.arange(0, BLOCK_X)
        rx, wx0, wx1, in_x = _axis(cols, x1, bw, R)
        inside = in_y[:, None] & in_x[None, :] & (rows[:, None] < height) & (cols[None, :] < width)
        acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
        for dy in tl.static_range(2):
            cy = ry + dy
            wy = wy0 if dy == 0 else wy1
            ok_y = (cy >= 0) & (cy < R)
            for dx in tl.static_range(2):
                cx = rx + dx
                wx = wx0 if dx == 0 else wx1
                ok = inside & ok_y[:, None] & ((cx >= 0) & (cx < R))[None, :]
                v = tl.load(base + cy[:, None] * R + cx[None, :], mask=ok, other=0.0)
                acc += v * (wy[:, None] * wx[None, :])
        keep = inside & (acc >= threshold)
        tl.store(out_rows + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < height) & (cols[None, :] < width))


def paste_binary_masks(masks: Tensor, boxes: Tensor, height: int, width: int,
                       threshold: float) -> Tensor:
    """bool [N, height, width]: mask probabilities [N, R, R] pasted into boxes [N, 4] (x1, y1,
    x2, y2, output pixels) and thresholded at `threshold`."""
    n, resolution = masks.shape[0], masks.shape[-1]
    out = torch.empty((n, height, width), dtype=torch.int8, device=masks.device)
    if n and height and width:
        block_y = 8
        _paste_binary[(n, triton.cdiv(height, block_y))](
            masks.float().contiguous(), boxes.float().contiguous(), out, height, width,
            float(threshold), R=resolution, BLOCK_Y=block_y, BLOCK_X=128)
    return out.view(torch.bool)
