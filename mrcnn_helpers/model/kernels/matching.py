"""RPN anchor labelling in Triton, without the anchors x ground-truth IoU matrix.

`label_rpn_anchors(box_iou(anchors, gt), ...)` materializes [B, A, M] IoUs (8 x 280k anchors x
100 rows at 832 x 1344: ~0.9 GB per tensor, a dozen passes over such tensors per step). Here
each program takes a block of anchors and walks the M ground-truth boxes, keeping the best IoU
and its index in registers; a second pass, once every ground truth's best anchor IoU is known
(an atomic max over the blocks), marks the low-quality matches. The IoU is computed as
box_ops.box_iou computes it (IEEE division), so the labels are the PyTorch path's. Both passes
skip the padding rows of the ground truth (a branch per row, uniform over the program): with
the seed spec's 100 rows and ~8 objects per image they computed 12 times the IoUs needed
(_label_pass alone took 0.63 ms per training step at 832x1344 on the H200,
docs/runs/profile_train_h200_channel_sum_2026-12-04.txt).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .boxes import load_xyxy

BLOCK = 256


@triton.jit
def _iou(ax1, ay1, ax2, ay2, area_a, gt_ptr):
    gx1 = tl.load(gt_ptr + 0)
    gy1 = tl.load(gt_ptr + 1)
    gx2 = tl.load(gt_ptr + 2)
    gy2 = tl.load(gt_ptr + 3)
    area_g = tl.maximum(gx2 - gx1, 0.0) * tl.maximum(gy2 - gy1, 0.0)
    w = tl.maximum(tl.minimum(ax2, gx2) - tl.maximum(ax1, gx1), 0.0)
    h = tl.maximum(tl.minimum(ay2, gy2) - tl.maximum(ay1, gy1), 0.0)
    inter = w * h
    union = area_a + area_g - inter
    return tl.math.div_rn(inter, tl.maximum(union, 1e-6))


@triton.jit
def _load_anchors(anchors_ptr, offs, inside):
    ax1, ay1, ax2, ay2 = load_xyxy(anchors_ptr, offs, inside)
    area = tl.maximum(ax2 - ax1, 0.0) * tl.maximum(ay2 - ay1, 0.0)
    return ax1, ay1, ax2, ay2, area


@triton.jit
def _best_gt_pass(anchors_ptr, gt_ptr, valid_ptr, max_iou_ptr, argmax_ptr, best_per_gt_ptr,
                  num_anchors, num_gt, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < num_anchors
    ax1, ay1, ax2, ay2, area = _load_anchors(anchors_ptr, offs, inside)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK,), dtype=tl.int64)
    for m in range(num_gt):
        # Padding rows (invalid) change nothing: an IoU of -1 never beats a valid one (>= 0),
        # and with no valid row at all the stored max IoU is 0 and the match 0 either way.
        if tl.load(valid_ptr + b * num_gt + m) != 0:
            iou = _iou(ax1, ay1, ax2, ay2, area, gt_ptr + (b * num_gt + m) * 4)
            better = iou > best
            best = tl.where(better, iou, best)
            arg = tl.where(better, m, arg)
            tl.atomic_max(best_per_gt_ptr + b * num_gt + m,
                          tl.max(tl.where(inside, iou, -1.0), axis=0))
    row = b.to(tl.int64) * num_anchors + offs
    tl.store(max_iou_ptr + row, tl.maximum(best, 0.0), mask=inside)
    tl.store(argmax_ptr + row, arg, mask=inside)


@triton.jit
def _label_pass(anchors_ptr, gt_ptr, valid_ptr, max_iou_ptr, argmax_ptr, best_per_gt_ptr,
                labels_ptr, matched_ptr, num_anchors, num_gt, positive, negative,
                BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < num_anchors
    ax1, ay1, ax2, ay2, area = _load_anchors(anchors_ptr, offs, inside)
    low_quality = offs < 0
    best_value = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_gt = tl.zeros((BLOCK,), dtype=tl.int64)
    for m in range(num_gt):
        top = tl.load(best_per_gt_ptr + b * num_gt + m)
        # Only a valid gt whose best anchor IoU is above 0 gives low-quality matches (one that
        # nothing overlaps gives none); the others are skipped.
        if (tl.load(valid_ptr + b * num_gt + m) != 0) & (top > 0.0):
            iou = _iou(ax1, ay1, ax2, ay2, area, gt_ptr + (b * num_gt + m) * 4)
            is_best = iou == top
            low_quality = low_quality | is_best
            candidate = tl.where(is_best, iou, -2.0)
            better = candidate > best_value
            best_value = tl.where(better, candidate, best_value)
            best_gt = tl.where(better, m, best_gt)
    row = b.to(tl.int64) * num_anchors + offs
    max_iou = tl.load(max_iou_ptr + row, mask=inside, other=0.0)
    matched = tl.load(argmax_ptr + row, mask=inside, other=0)
    labels = tl.full((BLOCK,), -1, tl.int64)
    labels = tl.where(max_iou < negative, 0, labels)
    labels = tl.where((max_iou >= positive) | low_quality, 1, labels)
    matched = tl.where(low_quality & (max_iou < positive), best_gt, matched)
    tl.store(labels_ptr + row, labels, mask=inside)
    tl.store(matched_ptr + row, matched, mask=inside)


def match_rpn_anchors(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
                      positive_overlap: float, negative_overlap: float) -> tuple[Tensor, Tensor]:
    """sampling.label_rpn_anchors(box_iou(anchors, gt_boxes), gt_valid, ...) without the IoU
    matrix: anchors [A, 4], gt_boxes [B, M, 4], gt_valid bool [B, M] -> (labels int64 [B, A] in
    {1, 0, -1}, matched gt index int64 [B, A])."""
    batch, num_gt = gt_valid.shape
    num_anchors = anchors.shape[0]
    device = anchors.device
    labels = torch.empty((batch, num_anchors), dtype=torch.int64, device=device)
    matched = torch.zeros((batch, num_anchors), dtype=torch.int64, device=device)
    if num_gt == 0:  # no ground truth: every anchor is background (IoU 0 < negative)
        labels.fill_(0 if negative_overlap > 0 else -1)
        return labels, matched
    anchors = anchors.float().contiguous()
    gt = gt_boxes.float().contiguous()
    valid = gt_valid.to(torch.int8).contiguous()
    max_iou = torch.empty((batch, num_anchors), dtype=torch.float32, device=device)
    best_per_gt = torch.full((batch, num_gt), -1.0, dtype=torch.float32, device=device)
    grid = (batch, triton.cdiv(num_anchors, BLOCK))
    _best_gt_pass[grid](anchors, gt, valid, max_iou, matched, best_per_gt, num_anchors, num_gt,
                        BLOCK=BLOCK)
    _label_pass[grid](anchors, gt, valid, max_iou, matched, best_per_gt, labels, matched,
                      num_anchors, num_gt, float(positive_overlap), float(negative_overlap),
                      BLOCK=BLOCK)
    return labels, matched
