"""Region proposal network: objectness + box deltas per anchor, proposals, and its losses.

The head is torchvision's `RPNHead` (so `rpn.head.*` weights load by name); everything around it is
batched over images with fixed output sizes: `post_nms_topn` proposals per image, padded with zero
boxes marked invalid.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead

from . import box_ops, kernels
from .anchors import generate_anchors, num_anchors_per_location
from .nms import nms_keep_mask, top_kept
from .sampling import FOREGROUND, label_rpn_anchors, sample_balanced

if kernels.ENABLED:
    from .kernels.matching import match_rpn_anchors

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# Smooth-L1 transition point of the box losses (Detectron's 1/9).
SMOOTH_L1_BETA = 1.0 / 9


class RegionProposalNetwork(nn.Module):
    def __init__(self, cfg, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(in_channels, num_anchors_per_location(cfg.num_scales, cfg.aspect_ratios))
        self.strides = [2 ** lvl for lvl in range(cfg.min_level, cfg.max_level + 1)]
        self._anchor_cache: dict = {}

    def anchors(self, features: list[Tensor]) -> tuple[Tensor, list[int]]:
        """Anchors Tensor[A, 4] for these feature sizes (cached) and the anchor count per level."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        key = (tuple(sizes), features[0].device)
        if key not in self._anchor_cache:
            anchors = generate_anchors(sizes, self.strides, self.cfg.anchor_scale, self.cfg.num_scales,
                                       self.cfg.aspect_ratios, features[0].device)
            per_level = [h * w * self.head.cls_logits.out_channels for h, w in sizes]
            self._anchor_cache = {key: (anchors, per_level)}
        return self._anchor_cache[key]

    def forward(self, features: list[Tensor], image_size: tuple[int, int],
                targets: dict | None = None) -> tuple[Tensor, Tensor, dict]:
        """features: FPN maps [B, C, H_l, W_l] for min_level..max_level.

        Returns (proposals Tensor[B, P, 4], valid bool Tensor[B, P], losses) with P the spec's
        train_/test_rpn_post_nms_topn; proposals are detached (no gradient flows through them).
        """
        logits, deltas = self.head(features)
        batch = features[0].shape[0]
        objectness = torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1) for o in logits], dim=1)
        box_deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(batch, -1, 4) for d in deltas], dim=1)
        anchors, per_level = self.anchors(features)
        proposals, valid = self.propose(objectness.detach(), box_deltas.detach(), anchors, per_level,
                                        image_size)
        losses = {}
        if self.training:
            losses = self.losses(objectness, box_deltas, anchors, targets)
        return proposals, valid, losses

    def propose(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, per_level: list[int],
                image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        pre_nms = cfg.train_rpn_pre_nms_topn if self.training else cfg.test_rpn_pre_nms_topn
        post_nms = cfg.train_rpn_post_nms_topn if self.training else cfg.test_rpn_post_nms_topn
        nms_thresh = cfg.train_rpn_nms_threshold if self.training else cfg.test_rpn_nms_thresh
        batch, num_levels = objectness.shape[0], len(per_level)
        # Top pre_nms anchors of each level (static sizes), padded to one length per level so
        # NMS treats every (image, level) as one row; then decode only those.
        width = min(pre_nms, max(per_level))
        scores, indices, real = [], [], []
        start = 0
        for count in per_level:
            k = min(pre_nms, count)
            top, idx = objectness[:, start:start + count].topk(k, dim=1)
            scores.append(F.pad(top, (0, width - k)))
            indices.append(F.pad(idx + start, (0, width - k)))
            real.append(torch.arange(width, device=objectness.device) < k)
            start += count
        scores = torch.stack(scores, dim=1).reshape(batch, -1)  # [B, L * width], level-major
        indices = torch.stack(indices, dim=1).reshape(batch, -1)
        real = torch.cat(real)
        boxes = box_ops.decode_boxes(deltas.gather(1, indices[..., None].expand(-1, -1, 4)),
                                     anchors[indices], RPN_BOX_WEIGHTS)
        boxes = box_ops.clip_boxes(boxes, *image_size)
        probs = scores.float().sigmoid()
        wh = boxes[..., 2:] - boxes[..., :2]
        candidate = (wh > max(cfg.rpn_min_size, 1e-3)).all(dim=-1) & real

        # NMS per level, as TLT and torchvision do, then the post_nms best kept boxes of each
        # image by score.
        rows = batch * num_levels
        keep = nms_keep_mask(boxes.reshape(rows, width, 4), probs.reshape(rows, width),
                             candidate.reshape(rows, width), nms_thresh).reshape(batch, -1)
        index, _, valid = top_kept(probs, keep, post_nms)
        out = boxes.gather(1, index[..., None].expand(-1, -1, 4)) * valid[..., None]
        return out, valid

    def losses(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: dict) -> dict:
        cfg = self.cfg
        score_loss, box_loss = rpn_losses(
            objectness, deltas, anchors, targets["boxes"], targets["classes"] > 0,
            positive_overlap=cfg.rpn_positive_overlap, negative_overlap=cfg.rpn_negative_overlap,
            batch_size_per_im=cfg.rpn_batch_size_per_im, fg_fraction=cfg.rpn_fg_fraction)
        return {"rpn_score_loss": score_loss, "rpn_box_loss": box_loss * cfg.rpn_box_loss_weight}


def rpn_losses(objectness: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor,
               gt_valid: Tensor, *, positive_overlap: float, negative_overlap: float,
               batch_size_per_im: int, fg_fraction: float) -> tuple[Tensor, Tensor]:
    """Objectness and box-regression losses of the RPN, as in TLT / Detectron.

    objectness [B, A] logits and deltas [B, A, 4] of every anchor; anchors [A, 4] input pixels;
    gt_boxes [B, M, 4] with gt_valid bool [B, M] (padding rows False). Anchors are labelled by
    IoU (positive >= positive_overlap or the best anchor of a ground truth, negative <
    negative_overlap), batch_size_per_im of them sampled per image with fg_fraction positives.
    Returns (binary cross-entropy over the sampled anchors, smooth-L1 over the positives; both
    divided by the number of sampled anchors).
    """
    if kernels.available(anchors):  # the same labels without the [B, A, M] IoU matrix
        labels, matched = match_rpn_anchors(anchors, gt_boxes, gt_valid, positive_overlap,
                                            negative_overlap)
    else:
        iou = box_ops.box_iou(anchors[None].expand(gt_boxes.shape[0], -1, -1), gt_boxes)
        labels, matched = label_rpn_anchors(iou, gt_valid, positive_overlap, negative_overlap)
    index, sampled = sample_balanced(labels, batch_size_per_im, fg_fraction)
    valid = sampled >= 0
    num_sampled = valid.sum().clamp(min=1)
    logits = objectness.gather(1, index)
    score_loss = F.binary_cross_entropy_with_logits(
        logits.float(), (sampled == FOREGROUND).float(), weight=valid.float(),
        reduction="sum") / num_sampled

    positive = sampled == FOREGROUND
    gt_index = matched.gather(1, index)
    target_boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
    box_targets = box_ops.encode_boxes(target_boxes, anchors[index], RPN_BOX_WEIGHTS)
    pred = deltas.gather(1, index[..., None].expand(-1, -1, 4)).float()
    box_loss = (F.smooth_l1_loss(pred, box_targets, beta=SMOOTH_L1_BETA, reduction="none")
                .sum(-1) * positive).sum() / num_sampled
    return score_loss, box_loss
