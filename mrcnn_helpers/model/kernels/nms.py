"""Greedy NMS for many rows at once in Triton: one program per row, exact, no host sync.

A row (an image, or an image's FPN level) holds K boxes sorted by descending score. The program
keeps the row's coordinates in registers and walks the boxes in order: a candidate not yet
suppressed is kept, and suppresses every later box of its group whose IoU with it is above the
threshold. That is greedy NMS by definition (torchvision's `batched_nms` on one row), computed
without the K x K suppression matrix and without the convergence checks of the fixed-point
formulation, so it can run inside a CUDA graph. IoU > t is tested as inter > t * union in fp32,
as model/nms.py does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Rows longer than this take the PyTorch path (registers hold a whole row).
MAX_ROW = 8192


@triton.jit
def _greedy_nms_rows(boxes_ptr, groups_ptr, candidate_ptr, keep_ptr, size, iou_threshold,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < size
    base = boxes_ptr + row.to(tl.int64) * size * 4
    x1 = tl.load(base + offs * 4 + 0, mask=inside, other=0.0)
    y1 = tl.load(base + offs * 4 + 1, mask=inside, other=0.0)
    x2 = tl.load(base + offs * 4 + 2, mask=inside, other=0.0)
    y2 = tl.load(base + offs * 4 + 3, mask=inside, other=0.0)
    area = (x2 - x1) * (y2 - y1)
    group = tl.load(groups_ptr + row.to(tl.int64) * size + offs, mask=inside, other=0)
    candidate = tl.load(candidate_ptr + row.to(tl.int64) * size + offs, mask=inside, other=0) != 0
    suppressed = offs < 0
    for i in range(size):
        alive = tl.sum(((offs == i) & candidate & ~suppressed).to(tl.int32), axis=0)
        if alive > 0:
            bx1 = tl.load(base + i * 4 + 0)
            by1 = tl.load(base + i * 4 + 1)
            bx2 = tl.load(base + i * 4 + 2)
            by2 = tl.load(base + i * 4 + 3)
            bgroup = tl.load(groups_ptr + row.to(tl.int64) * size + i)
            w = tl.maximum(tl.minimum(x2, bx2) - tl.maximum(x1, bx1), 0.0)
            h = tl.maximum(tl.minimum(y2, by2) - tl.maximum(y1, by1), 0.0)
            inter = w * h
            union = ((bx2 - bx1) * (by2 - by1) + area) - inter
            suppressed = suppressed | ((inter > union * iou_threshold) & (offs > i)
                                       & (group == bgroup))
    tl.store(keep_ptr + row.to(tl.int64) * size + offs, (candidate & ~suppressed).to(tl.int8),
             mask=inside)


def greedy_nms_rows(sorted_boxes: Tensor, sorted_groups: Tensor, sorted_candidate: Tensor,
                    iou_threshold: float) -> Tensor:
    """Greedy NMS of rows sorted by descending score.

    sorted_boxes float [R, K, 4] (x1, y1, x2, y2); sorted_groups integer [R, K]; sorted_candidate
    bool [R, K]. Returns bool [R, K]: kept, in the same (sorted) order.
    """
    rows, size = sorted_candidate.shape
    keep = torch.empty((rows, size), dtype=torch.int8, device=sorted_boxes.device)
    if rows and size:
        block = triton.next_power_of_2(size)
        _greedy_nms_rows[(rows,)](
            sorted_boxes.float().contiguous(), sorted_groups.to(torch.int32).contiguous(),
            sorted_candidate.to(torch.int8).contiguous(), keep, size, float(iou_threshold),
            BLOCK=block, num_warps=min(16, max(4, block // 256)))
    return keep.bool()
