"""Box helpers shared by the Triton kernels that read rows of (x1, y1, x2, y2) boxes."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_xyxy(boxes_ptr, index, inside):
    """(x1, y1, x2, y2) of the boxes at `index` of a [K, 4] fp32 array (0 where not inside)."""
    x1 = tl.load(boxes_ptr + index * 4 + 0, mask=inside, other=0.0)
    y1 = tl.load(boxes_ptr + index * 4 + 1, mask=inside, other=0.0)
    x2 = tl.load(boxes_ptr + index * 4 + 2, mask=inside, other=0.0)
    y2 = tl.load(boxes_ptr + index * 4 + 3, mask=inside, other=0.0)
    return x1, y1, x2, y2
