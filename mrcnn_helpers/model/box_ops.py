"""Box maths: IoU, clipping and the (dx, dy, dw, dh) box coding of R-CNN.

Boxes are float Tensor[..., 4] as (x1, y1, x2, y2) in input pixels, continuous coordinates
(pixel i covers [i, i + 1)); width = x2 - x1. Every function is batched over leading dimensions
so the RPN and RoI heads work on whole batches at fixed shapes.
"""

import math

import torch
from torch import Tensor

# Exponentiated deltas are clamped so a wild regression cannot overflow; exp(log(1000 / 16))
# lets a box grow 62x, more than any anchor-to-object ratio in practice.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """Area of boxes Tensor[..., 4] -> Tensor[...]; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M].

    Pairs where both boxes are empty get IoU 0 (not NaN).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union.clamp(min=1e-6)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip boxes Tensor[..., 4] to the image [0, width] x [0, height]."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def encode_boxes(targets: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets that move `references` onto `targets`, both Tensor[..., 4] -> Tensor[..., 4].

    dx = wx * (cx_t - cx_r) / w_r, dy likewise, dw = ww * log(w_t / w_r), dh likewise.
    `weights` (wx, wy, ww, wh) are the spec's bbox_reg_weights (1, 1, 1, 1 for the RPN).
    """
    wx, wy, ww, wh = weights
    ref_w = (references[..., 2] - references[..., 0]).clamp(min=1e-3)
    ref_h = (references[..., 3] - references[..., 1]).clamp(min=1e-3)
    ref_cx = references[..., 0] + 0.5 * ref_w
    ref_cy = references[..., 1] + 0.5 * ref_h
    tgt_w = (targets[..., 2] - targets[..., 0]).clamp(min=1e-3)
    tgt_h = (targets[..., 3] - targets[..., 1]).clamp(min=1e-3)
    tgt_cx = targets[..., 0] + 0.5 * tgt_w
    tgt_cy = targets[..., 1] + 0.5 * tgt_h
    return torch.stack(
        (
            wx * (tgt_cx - ref_cx) / ref_w,
            wy * (tgt_cy - ref_cy) / ref_h,
            ww * torch.log(tgt_w / ref_w),
            wh * torch.log(tgt_h / ref_h),
        ),
        dim=-1,
    )


def decode_boxes(deltas: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Inverse of `encode_boxes`: apply deltas Tensor[..., 4] to references Tensor[..., 4]."""
    wx, wy, ww, wh = weights
    deltas = deltas.float()
    references = references.float()
    ref_w = references[..., 2] - references[..., 0]
    ref_h = references[..., 3] - references[..., 1]
    ref_cx = references[..., 0] + 0.5 * ref_w
    ref_cy = references[..., 1] + 0.5 * ref_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    cx = dx * ref_w + ref_cx
    cy = dy * ref_h + ref_cy
    w = torch.exp(dw) * ref_w
    h = torch.exp(dh) * ref_h
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
