"""Greedy NMS for many rows at once in Triton: exact, no host sync, graph-capturable.

A row (an image, or an image's FPN level) holds K boxes sorted by descending score. Greedy NMS
(torchvision's `batched_nms` on one row) keeps a candidate not yet suppressed and suppresses
every later box of its group whose IoU with it is above the threshold. IoU > t is tested as
inter > t * union in fp32, as model/nms.py does. Two ways to compute it:

- walk (`_greedy_nms_rows`): one program per row keeps the row's coordinates in registers and
  walks the boxes in order, computing the kept box's IoUs with the whole row; each step needs
  the current box's state from a vector spread over the program's warps (a reduction), so a
  row of 2000 boxes is 2000 dependent steps: 1.09 ms per training step for the RPN's 40 rows at
  832x1344, batch 8, on the H200 (docs/runs/profile_train_h200_channel_sum_2026-12-04.txt).
- bitmask (`_suppression_bits` + `_scan_bits`, rows of at most BITMASK_MAX_ROW boxes): first,
  in parallel over the whole GPU, bit j % 32 of word [r, i, j // 32] says "box i would
  suppress box j" (j > i, same group, IoU above the threshold); then one single-warp program per
  row scans the row 32 boxes at a time: it loads those boxes' bit rows at once, resolves which
  of the 32 are kept with scalar bit operations on one word, and ORs the kept boxes' rows into
  its suppression bits. Predicted: tens of microseconds instead of a millisecond for the RPN's
  rows. Opt-in with MRCNN_NMS_BITMASK=1 until measured on the GPU machine.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .boxes import load_xyxy

# Rows longer than this take the PyTorch path (registers hold a whole row).
MAX_ROW = 8192
BITMASK = os.environ.get("MRCNN_NMS_BITMASK", "0") == "1"
# The scan holds 32 bit rows of K / 32 words in one warp's registers: 64 words per row at most.
BITMASK_MAX_ROW = 2048
_BOXES_PER_PROGRAM = 64  # rows i of the bit matrix per program of _suppression_bits


@triton.jit
def _greedy_nms_rows(boxes_ptr, groups_ptr, candidate_ptr, keep_ptr, size, iou_threshold,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < size
    base = boxes_ptr + row.to(tl.int64) * size * 4
    x1, y1, x2, y2 = load_xyxy(base, offs, inside)
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


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _suppression_bits(boxes_ptr, groups_ptr, bits_ptr, size, words, iou_threshold,
                      BLOCK_I: tl.constexpr):
    """bits[r, i, w], bit k: box i suppresses box j = 32 w + k if kept (j > i, same group,
    IoU > t); words left of box i's own word are not written (the scan never reads them)."""
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK_I
    i = start + tl.arange(0, BLOCK_I)
    i_in = i < size
    row_start = row.to(tl.int64) * size
    base = boxes_ptr + row_start * 4
    ax1, ay1, ax2, ay2 = load_xyxy(base, i, i_in)
    a_area = (ax2 - ax1) * (ay2 - ay1)
    a_group = tl.load(groups_ptr + row_start + i, mask=i_in, other=0)
    lanes = tl.arange(0, 32)
    for w in range(start // 32, words):
        j = w * 32 + lanes
        j_in = j < size
        bx1, by1, bx2, by2 = load_xyxy(base, j, j_in)
        b_area = (bx2 - bx1) * (by2 - by1)
        b_group = tl.load(groups_ptr + row_start + j, mask=j_in, other=0)
        w_ = tl.maximum(tl.minimum(ax2[:, None], bx2[None, :])
                        - tl.maximum(ax1[:, None], bx1[None, :]), 0.0)
        h_ = tl.maximum(tl.minimum(ay2[:, None], by2[None, :])
                        - tl.maximum(ay1[:, None], by1[None, :]), 0.0)
        inter = w_ * h_
        union = (a_area[:, None] + b_area[None, :]) - inter
        hit = ((inter > union * iou_threshold) & (j[None, :] > i[:, None])
               & (a_group[:, None] == b_group[None, :]) & j_in[None, :])
        word = tl.reduce(hit.to(tl.int32) << lanes[None, :], 1, _bit_or)  # bit 31: the sign
        tl.store(bits_ptr + (row_start + i) * words + w, word, mask=i_in)


@triton.jit
def _scan_bits(bits_ptr, candidate_ptr, keep_ptr, size, words, WORDS: tl.constexpr):
    """keep[r, i]: greedy NMS of row r from its suppression bits, 32 boxes per step."""
    row = tl.program_id(0)
    row_start = row.to(tl.int64) * size
    widx = tl.arange(0, WORDS)
    lanes = tl.arange(0, 32)
    removed = tl.zeros([WORDS], dtype=tl.int32)  # bit k of word w: box 32 w + k suppressed
    for w in range(words):
        i = w * 32 + lanes
        i_in = i < size
        later = (widx >= w) & (widx < words)
        tile = tl.load(bits_ptr + (row_start + i)[:, None] * words + widx[None, :],
                       mask=i_in[:, None] & later[None, :], other=0)  # the 32 boxes' bit rows
        candidate = tl.load(candidate_ptr + row_start + i, mask=i_in, other=0) != 0
        candidates = tl.reduce(candidate.to(tl.int32) << lanes, 0, _bit_or)
        current = tl.sum(tl.where(widx == w, removed, 0), axis=0)  # these boxes' bits so far
        kept = current * 0
        for k in tl.static_range(32):
            # box 32 w + k's bits within its own word (a scalar load, independent of the scan)
            own = tl.load(bits_ptr + (row_start + w * 32 + k) * words + w,
                          mask=w * 32 + k < size, other=0)
            alive = (((current >> k) & 1) == 0) & (((candidates >> k) & 1) == 1)
            kept = kept | (alive.to(tl.int32) << k)
            current = tl.where(alive, current | own, current)
        alive_rows = ((kept >> lanes) & 1) == 1
        tl.store(keep_ptr + row_start + i, alive_rows.to(tl.int8), mask=i_in)
        removed = removed | tl.reduce(tl.where(alive_rows[:, None], tile, 0), 0, _bit_or)


def bitmask_nms_rows(sorted_boxes: Tensor, sorted_groups: Tensor, sorted_candidate: Tensor,
                     iou_threshold: float) -> Tensor:
    """greedy_nms_rows by the suppression bits and a 32-box scan (rows of at most
    BITMASK_MAX_ROW boxes)."""
    rows, size = sorted_candidate.shape
    if size > BITMASK_MAX_ROW:
        raise ValueError(f"bitmask NMS takes rows of at most {BITMASK_MAX_ROW} boxes, not {size}")
    keep = torch.empty((rows, size), dtype=torch.int8, device=sorted_boxes.device)
    if rows and size:
        words = triton.cdiv(size, 32)
        boxes = sorted_boxes.float().contiguous()
        groups = sorted_groups.to(torch.int32).contiguous()
        bits = torch.empty((rows, size, words), dtype=torch.int32, device=boxes.device)
        _suppression_bits[(rows, triton.cdiv(size, _BOXES_PER_PROGRAM))](
            boxes, groups, bits, size, words, float(iou_threshold), BLOCK_I=_BOXES_PER_PROGRAM)
        _scan_bits[(rows,)](bits, sorted_candidate.to(torch.int8).contiguous(), keep, size,
                            words, WORDS=max(16, triton.next_power_of_2(words)), num_warps=1)
    return keep.bool()


def walk_nms_rows(sorted_boxes: Tensor, sorted_groups: Tensor, sorted_candidate: Tensor,
                  iou_threshold: float) -> Tensor:
    """greedy_nms_rows by one program per row walking its boxes (rows of up to MAX_ROW)."""
    rows, size = sorted_candidate.shape
    keep = torch.empty((rows, size), dtype=torch.int8, device=sorted_boxes.device)
    if rows and size:
        block = triton.next_power_of_2(size)
        _greedy_nms_rows[(rows,)](
            sorted_boxes.float().contiguous(), sorted_groups.to(torch.int32).contiguous(),
            sorted_candidate.to(torch.int8).contiguous(), keep, size, float(iou_threshold),
            BLOCK=block, num_warps=min(16, max(4, block // 256)))
    return keep.bool()


def greedy_nms_rows(sorted_boxes: Tensor, sorted_groups: Tensor, sorted_candidate: Tensor,
                    iou_threshold: float) -> Tensor:
    """Greedy NMS of rows sorted by descending score.

    sorted_boxes float [R, K, 4] (x1, y1, x2, y2); sorted_groups integer [R, K]; sorted_candidate
    bool [R, K]. Returns bool [R, K]: kept, in the same (sorted) order. The bitmask path where
    it is switched on (BITMASK) and the rows fit, else the walk.
    """
    if BITMASK and sorted_candidate.shape[1] <= BITMASK_MAX_ROW:
        return bitmask_nms_rows(sorted_boxes, sorted_groups, sorted_candidate, iou_threshold)
    return walk_nms_rows(sorted_boxes, sorted_groups, sorted_candidate, iou_threshold)
