"""The ResNet stem's 7 x 7 stride-2 convolution of 3-channel images as a 4 x 4 stride-1
convolution of their 2 x 2 space-to-depth blocks (12 channels): the same products and sums,
grouped differently.

cuDNN runs the 3-channel 7 x 7 convolution far from its arithmetic speed (1.24 ms per training
step for ~42 GFLOP at 832x1344, batch 8, bf16, on the H200: 2026-12-04,
docs/runs/profile_train_h200_channel_sum_2026-12-04.txt), and zero-padding the input to 8
channels did not change that (2026-12-02). Rewritten on space-to-depth blocks, the input has 12
channels and the filter 4 x 4 at stride 1, a shape convolution kernels handle well.

With x padded by 3 on every side, output (i, j) of the stride-2 convolution reads rows 2i + u,
u = 0..6. Extending the filter to 8 x 8 with zeros (u = 7) and writing u = 2p + q (p = 0..3,
q = 0..1), that row is 2(i + p) + q: row i + p of the space-to-depth block q. So the output is
a 4 x 4 convolution, without padding, of pixel_unshuffle(pad(x, 3), 2), with the weight
w8[k, c, 2p + q, 2p' + q'] moved to [k, (c, q, q'), p, p'] (pixel_unshuffle's channel order).

On by default for the folded stem on CUDA (MRCNN_STEM_S2D=0 turns it off): on the H200 the
stem's forward took 0.79 ms instead of 1.25 ms (benchmarks/bench_stem.py) and the training step
at 832x1344 went from 37.1 to 36.6 ms (2026-12-04, docs/runs/bench_stem_h200_2026-12-04.txt,
docs/runs/bench_h200_train_variants_2026-12-04.txt). The export and CPU keep the plain
convolution.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = os.environ.get("MRCNN_STEM_S2D", "1") != "0"


def space_to_depth_weight(weight: Tensor) -> Tensor:
    """[K, C, 7, 7] -> [K, 4C, 4, 4]: the filter of the stride-1 convolution of the 2 x 2 blocks."""
    k, c = weight.shape[:2]
    w8 = F.pad(weight, (0, 1, 0, 1))  # [K, C, 8, 8], zero last row and column
    w8 = w8.reshape(k, c, 4, 2, 4, 2)  # [k, c, p, q, p', q']
    return w8.permute(0, 1, 3, 5, 2, 4).reshape(k, 4 * c, 4, 4)


def space_to_depth_blocks(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 4C, H/2 + 3, W/2 + 3]: the 2 x 2 blocks of x padded by 3, in x's
    memory format."""
    blocks = F.pixel_unshuffle(F.pad(x, (3, 3, 3, 3)), 2)
    if x.is_contiguous(memory_format=torch.channels_last):
        blocks = blocks.contiguous(memory_format=torch.channels_last)
    return blocks


def conv7x7_stride2_space_to_depth(x: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(x, weight, stride=2, padding=3) for a 7 x 7 weight and even H, W, computed as a
    4 x 4 stride-1 convolution of x's 2 x 2 space-to-depth blocks."""
    return F.conv2d(space_to_depth_blocks(x), space_to_depth_weight(weight))


def applies(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether `conv` on x is the stem's 7 x 7 stride-2 convolution (padding 3, no dilation or
    groups) on a map of even height and width, and the rewrite is switched on for x's device."""
    return (ENABLED and x.is_cuda and not torch.onnx.is_in_onnx_export()
            and is_stem_shape(conv, x))


def is_stem_shape(conv: nn.Conv2d, x: Tensor) -> bool:
    """The shape condition of `applies`, on any device."""
    return (tuple(conv.kernel_size) == (7, 7) and tuple(conv.stride) == (2, 2)
            and tuple(conv.padding) == (3, 3) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and x.dim() == 4 and x.shape[-2] % 2 == 0
            and x.shape[-1] % 2 == 0)
