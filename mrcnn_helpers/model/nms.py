"""Non-maximum suppression for a whole batch at fixed shapes: keep masks instead of index lists.

Greedy NMS keeps a box unless a higher-scoring kept box of the same row (an image, or an image's
FPN level) and group (a class) overlaps it by more than the IoU threshold: what
`torchvision.ops.batched_nms` computes on one image. Calling that per image and level costs a host
synchronization each, and torchvision's CUDA kernel resolves the suppression mask in one
sequential pass over every box of the call (one thread block): ~30 ms per training step for the
RPN's ~70k candidates at batch 8.

On CUDA with Triton (model/kernels/nms.py) one program per row walks the row's boxes in score
order, exactly as greedy NMS is defined, with no host sync and no K x K matrix: the path a CUDA
graph captures (MRCNN_NMS_BITMASK=1: the same result from a K x K bit matrix built in parallel
and scanned 32 boxes at a time). Without Triton, CUDA computes the same greedy result for all rows at once as a
fixed point: with M[i, j]
"box i suppresses box j if i is kept" (same group, higher score, IoU above the threshold),
keep[j] = candidate[j] and no i with keep[i] and M[i, j]. Greedy NMS is the unique solution (by
induction over the score order), and iterating keep <- f(keep) from all-candidates reaches it after
at most as many steps as the longest chain of suppressions, usually a handful; each step is one
batched matrix-vector product. Convergence is checked every few steps, the only host syncs. On the
CPU, where small sizes are the rule, rows go through torchvision's NMS one by one.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from . import kernels
from .box_ops import box_area

if kernels.ENABLED:
    from .kernels.nms import MAX_ROW, greedy_nms_rows

# Fixed-point steps between convergence checks (each check is a host sync).
STEPS_PER_CHECK = 4


def nms_keep_mask(boxes: Tensor, scores: Tensor, candidate: Tensor, iou_threshold: float,
                  groups: Tensor | None = None) -> Tensor:
    """Which boxes greedy NMS keeps in each row.

    boxes: Tensor[R, K, 4] (x1, y1, x2, y2); scores: Tensor[R, K]; candidate: bool Tensor[R, K]
    (False: neither kept nor suppressing); groups: long Tensor[R, K] or None (boxes of different
    groups never suppress each other). Returns bool Tensor[R, K].
    """
    if groups is None:
        groups = torch.zeros(candidate.shape, dtype=torch.long, device=candidate.device)
    if scores.numel() == 0:
        return candidate.clone()
    if kernels.available(boxes) and boxes.shape[1] <= MAX_ROW:
        return _kernel_nms(boxes, scores, candidate, iou_threshold, groups)
    if boxes.is_cuda:
        return _fixed_point_nms(boxes, scores, candidate, iou_threshold, groups)
    keep = torch.zeros_like(candidate)
    for row in range(scores.shape[0]):
        sel = candidate[row].nonzero().squeeze(1)
        kept = batched_nms(boxes[row, sel].float(), scores[row, sel].float(), groups[row, sel],
                           iou_threshold)
        keep[row, sel[kept]] = True
    return keep


def suppression_matrix(boxes: Tensor, candidate: Tensor, iou_threshold: float,
                       groups: Tensor) -> Tensor:
    """M[r, i, j]: box i may suppress box j (rows sorted by descending score, so i < j)."""
    b = boxes.float()
    x1, y1, x2, y2 = (b[..., k] for k in range(4))
    w = (torch.minimum(x2[:, :, None], x2[:, None, :])
         - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :])
         - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    del h
    area = box_area(b)
    union = (area[:, :, None] + area[:, None, :]).sub_(inter)
    # IoU > t  <=>  inter > t * union, without a division (and 0/0 is never above t).
    m = inter > union.mul_(iou_threshold)
    del inter, union
    k = boxes.shape[1]
    m &= torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu_(1)
    m &= groups[:, :, None] == groups[:, None, :]
    m &= candidate[:, :, None]
    return m


def _score_order(scores: Tensor, candidate: Tensor) -> Tensor:
    """Each row's indices by descending score, candidates first (stable: ties keep their order)."""
    return scores.float().masked_fill(~candidate, float("-inf")).argsort(dim=1, descending=True,
                                                                          stable=True)


def _kernel_nms(boxes: Tensor, scores: Tensor, candidate: Tensor, iou_threshold: float,
                groups: Tensor) -> Tensor:
    order = _score_order(scores, candidate)
    keep = greedy_nms_rows(boxes.gather(1, order[..., None].expand(-1, -1, 4)),
                           groups.gather(1, order), candidate.gather(1, order), iou_threshold)
    out = torch.empty_like(keep)
    out.scatter_(1, order, keep)
    return out


def _fixed_point_nms(boxes: Tensor, scores: Tensor, candidate: Tensor, iou_threshold: float,
                     groups: Tensor) -> Tensor:
    order = _score_order(scores, candidate)
    sorted_candidate = candidate.gather(1, order)
    m = suppression_matrix(boxes.gather(1, order[..., None].expand(-1, -1, 4)), sorted_candidate,
                           iou_threshold, groups.gather(1, order))
    # 0/1 values and a "> 0" test: exact in bf16 (tensor cores accumulate in fp32).
    m = m.to(torch.bfloat16)
    keep = sorted_candidate
    for _ in range(0, boxes.shape[1] + STEPS_PER_CHECK, STEPS_PER_CHECK):
        for _ in range(STEPS_PER_CHECK):
            previous = keep
            suppressed = torch.bmm(keep[:, None, :].to(m.dtype), m)[:, 0] > 0
            keep = sorted_candidate & ~suppressed
        if torch.equal(keep, previous):
            break
    out = torch.empty_like(keep)
    out.scatter_(1, order, keep)
    return out


def top_kept(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k highest-scoring kept entries of each row, best first.

    scores: Tensor[B, N] of probabilities (> -1); keep: bool Tensor[B, N]. Returns (index Long[B, k],
    score Tensor[B, k], valid bool Tensor[B, k]); rows with fewer than k kept entries (or N < k)
    end in invalid slots (score 0, index 0).
    """
    n = scores.shape[1]
    masked = torch.where(keep, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    values, index = masked.topk(min(k, n), dim=1, sorted=True)
    valid = keep.gather(1, index)
    if k > n:
        index, values = F.pad(index, (0, k - n)), F.pad(values, (0, k - n))
        valid = F.pad(valid, (0, k - n))
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, torch.where(valid, values, torch.zeros_like(values)).to(scores.dtype), valid
