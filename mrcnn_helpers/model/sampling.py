"""Matching anchors / proposals to ground truth, and fixed-size balanced sampling.

Everything is batched ([B, N] per image rows) and keeps static shapes: labels are 1 (foreground),
0 (background) or -1 (ignored), and the sampler returns exactly `num_samples` slots per image with
a validity flag instead of variable-length index lists.
"""

import torch
from torch import Tensor

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


def match_to_gt(iou: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Best ground truth per candidate.

    iou: Tensor[B, N, M] candidate-vs-gt IoU; gt_valid: bool Tensor[B, M] (False for padding rows).
    Returns (max_iou Tensor[B, N], matched gt index Long[B, N]); candidates of an image with no valid
    gt get max_iou 0 and index 0 (they can only be background).
    """
    iou = iou.masked_fill(~gt_valid[:, None, :], -1.0)
    if iou.shape[-1] == 0:
        zeros = iou.new_zeros(iou.shape[:2])
        return zeros, zeros.long()
    max_iou, matched = iou.max(dim=-1)
    return max_iou.clamp(min=0.0), matched


def label_rpn_anchors(iou: Tensor, gt_valid: Tensor, positive_overlap: float,
                      negative_overlap: float) -> tuple[Tensor, Tensor]:
    """RPN anchor labels: Tensor[B, N] in {1, 0, -1} and the matched gt index Long[B, N].

    Foreground: IoU >= positive_overlap, or the anchor is (one of) the best for some gt, so that
    every object has at least one positive anchor even when none reaches the threshold.
    Background: IoU < negative_overlap. In between: ignored.
    """
    max_iou, matched = match_to_gt(iou, gt_valid)
    labels = torch.full_like(matched, IGNORE)
    labels.masked_fill_(max_iou < negative_overlap, BACKGROUND)
    labels.masked_fill_(max_iou >= positive_overlap, FOREGROUND)
    if iou.shape[-1] > 0:
        masked = iou.masked_fill(~gt_valid[:, None, :], -1.0)
        best_per_gt = masked.max(dim=1, keepdim=True).values  # [B, 1, M]
        # A gt with no overlapping anchor at all gives no low-quality match (its best IoU is 0).
        is_best = (masked == best_per_gt) & (best_per_gt > 0) & gt_valid[:, None, :]
        low_quality = is_best.any(dim=-1)
        labels.masked_fill_(low_quality, FOREGROUND)
        # Point low-quality positives at the gt they are best for, not their argmax (ties aside
        # these are the same gt).
        best_gt = torch.where(is_best, masked, torch.full_like(masked, -2.0)).argmax(dim=-1)
        matched = torch.where(low_quality & (max_iou < positive_overlap), best_gt, matched)
    return labels, matched


def label_proposals(iou: Tensor, gt_valid: Tensor, fg_thresh: float, bg_thresh_hi: float,
                    bg_thresh_lo: float) -> tuple[Tensor, Tensor]:
    """Second-stage labels: foreground IoU >= fg_thresh, background in [bg_thresh_lo, bg_thresh_hi)."""
    max_iou, matched = match_to_gt(iou, gt_valid)
    labels = torch.full_like(matched, IGNORE)
    labels.masked_fill_((max_iou >= bg_thresh_lo) & (max_iou < bg_thresh_hi), BACKGROUND)
    labels.masked_fill_(max_iou >= fg_thresh, FOREGROUND)
    return labels, matched


def sample_balanced(labels: Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Pick `num_samples` candidates per image, at most `positive_fraction` of them foreground.

    Every step is a fixed-shape device operation (masked fills, top-k of random keys): no host
    synchronization, so a CUDA graph can capture it.

    labels: Tensor[B, N] in {1, 0, -1}. Returns (index Long[B, S], sampled label Long[B, S]) with
    S = num_samples: the positives first (slots 0..P-1, P = min(#fg, S * fraction)), then negatives
    (up to S - P of them); unfilled slots have label -1 and index 0. Positives coming first lets the
    mask head take a fixed prefix of the slots. Sampling is uniformly random without replacement.
    """
    batch, n = labels.shape
    k = min(num_samples, n)
    max_pos = int(num_samples * positive_fraction)
    noise = torch.rand(labels.shape, device=labels.device, generator=generator)
    pos_key = torch.where(labels == FOREGROUND, noise, torch.full_like(noise, -1.0))
    neg_key = torch.where(labels == BACKGROUND, noise, torch.full_like(noise, -1.0))
    pos_val, pos_idx = pos_key.topk(k, dim=1)
    neg_val, neg_idx = neg_key.topk(k, dim=1)
    num_pos = (pos_val >= 0).sum(dim=1).clamp(max=max_pos)  # [B]
    num_neg = torch.minimum((neg_val >= 0).sum(dim=1), num_samples - num_pos)
    slot = torch.arange(num_samples, device=labels.device)[None].expand(batch, -1)
    is_pos = slot < num_pos[:, None]
    neg_slot = (slot - num_pos[:, None]).clamp(min=0, max=k - 1)
    is_neg = ~is_pos & (slot - num_pos[:, None] < num_neg[:, None])
    pos_slot = slot.clamp(max=k - 1)
    index = torch.where(is_pos, pos_idx.gather(1, pos_slot), neg_idx.gather(1, neg_slot))
    sampled = torch.full_like(index, IGNORE)
    sampled.masked_fill_(is_pos, FOREGROUND)
    sampled.masked_fill_(is_neg, BACKGROUND)
    index = torch.where(sampled == IGNORE, torch.zeros_like(index), index)
    return index, sampled
