"""The gradient through a residual block's final ReLU when its output's gradient arrives in two
parts (the next block's first convolution and its identity branch): (a + b) where y > 0, one
pass (model/fused_stage.py says where).

Computed in fp32 and rounded once to a's dtype; autograd's composition rounds a + b first, so
the two can differ by one rounding step of the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _relu_grad_of_sum(a_ptr, b_ptr, y_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    g = tl.load(a_ptr + offs, mask=inside, other=0).to(tl.float32)
    g += tl.load(b_ptr + offs, mask=inside, other=0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=inside, other=0)
    g = tl.where(y > 0, g, 0.0)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=inside)


def relu_grad_of_sum(a: Tensor, b: Tensor, y: Tensor) -> Tensor:
    """(a + b) where y > 0, else 0, in y's (channels_last) layout and a's dtype; a and b are
    brought to y's layout."""
    cl = torch.channels_last
    a, b = a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)
    out = torch.empty_like(y, dtype=a.dtype)
    if out.numel():
        _relu_grad_of_sum[(triton.cdiv(out.numel(), BLOCK),)](a, b, y, out, out.numel(),
                                                             BLOCK=BLOCK)
    return out
