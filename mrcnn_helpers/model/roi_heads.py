"""Second stage: RoI sampling, multi-level RoIAlign, box and mask heads, losses and detections.

Head modules are torchvision's (`box_head.fc6/fc7`, `box_predictor.cls_score/bbox_pred`,
`mask_head.N.0`, `mask_predictor.conv5_mask/mask_fcn_logits`) so weights load by name. Sampled RoIs
and detections have fixed counts per image (batch_size_per_im, test_detections_per_image).
"""


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import batched_nms, roi_align

from . import box_ops
from .masks import project_masks_to_rois
from .rpn import SMOOTH_L1_BETA
from .sampling import FOREGROUND, IGNORE, label_proposals, sample_balanced

BOX_POOL_SIZE = 7
# RoIs are assigned to FPN levels 2..5 only (P6 feeds the RPN), by the FPN paper's rule.
ROI_MAX_LEVEL = 5
CANONICAL_SIZE, CANONICAL_LEVEL = 224, 4


def assign_roi_levels(boxes: Tensor, min_level: int, max_level: int) -> Tensor:
    """FPN level of each box Tensor[..., 4]: floor(4 + log2(sqrt(area) / 224)), clamped."""
    scale = box_ops.box_area(boxes).clamp(min=1e-6).sqrt()
    level = torch.floor(CANONICAL_LEVEL + torch.log2(scale / CANONICAL_SIZE) + 1e-6)
    return level.clamp(min_level, max_level).long()


def multilevel_roi_align(features: list[Tensor], boxes: Tensor, output_size: int, min_level: int,
                         max_level: int) -> Tensor:
    """RoIAlign each box on its FPN level.

    features: maps for levels min_level.. (stride 2**level); boxes: Tensor[B, K, 4] input pixels.
    Returns Tensor[B * K, C, output_size, output_size] in box order.
    """
    batch, k = boxes.shape[:2]
    flat = boxes.reshape(-1, 4)
    image_index = torch.arange(batch, device=boxes.device).repeat_interleave(k).to(flat.dtype)
    rois = torch.cat((image_index[:, None], flat), dim=1)
    levels = assign_roi_levels(flat, min_level, max_level)
    out = features[0].new_zeros((batch * k, features[0].shape[1], output_size, output_size))
    for offset, level in enumerate(range(min_level, max_level + 1)):
        idx = (levels == level).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        feat = features[offset]
        pooled = roi_align(feat, rois[idx].to(feat.dtype), (output_size, output_size),
                           spatial_scale=1.0 / 2 ** level, sampling_ratio=2, aligned=False)
        out[idx] = pooled.to(out.dtype)
    return out


class RoIHeads(nn.Module):
    def __init__(self, cfg, num_classes: int, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.box_head = TwoMLPHead(in_channels * BOX_POOL_SIZE ** 2, cfg.fast_rcnn_mlp_head_dim)
        self.box_predictor = FastRCNNPredictor(cfg.fast_rcnn_mlp_head_dim, num_classes)
        self.mask_head = MaskRCNNHeads(in_channels, [256, 256, 256, 256], dilation=1)
        self.mask_predictor = MaskRCNNPredictor(256, 256, num_classes)
        # Small initial class, box and mask outputs (Detectron's init): torchvision's defaults give
        # mask logits of magnitude ~10 at the start, which makes training from scratch diverge.
        for layer, std in ((self.box_predictor.cls_score, 0.01), (self.box_predictor.bbox_pred, 0.001),
                           (self.mask_predictor.mask_fcn_logits, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.roi_levels = (cfg.min_level, min(cfg.max_level, ROI_MAX_LEVEL))
        self.box_weights = tuple(cfg.bbox_reg_weights)
        # The mask head pools at half its output resolution (its deconv doubles it).
        self.mask_pool_size = cfg.mrcnn_resolution // 2

    # ---- shared pieces ----
    def box_forward(self, features: list[Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
        pooled = multilevel_roi_align(features, boxes, BOX_POOL_SIZE, *self.roi_levels)
        return self.box_predictor(self.box_head(pooled))

    def mask_forward(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """Mask logits Tensor[B * K, num_classes, R, R] for boxes Tensor[B, K, 4]."""
        pooled = multilevel_roi_align(features, boxes, self.mask_pool_size, *self.roi_levels)
        return self.mask_predictor(self.mask_head(pooled))

    def forward(self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor,
                image_size: tuple[int, int], targets: dict | None = None):
        if self.training:
            return {}, self.losses(features, proposals, proposal_valid, targets)
        return self.detect(features, proposals, proposal_valid, image_size), {}

    # ---- training ----
    def losses(self, features, proposals, proposal_valid, targets) -> dict:
        cfg = self.cfg
        gt_boxes, gt_classes = targets["boxes"], targets["classes"]
        gt_valid = gt_classes > 0
        # Ground-truth boxes join the proposals so every object has positive RoIs from step one.
        candidates = torch.cat((proposals, gt_boxes.to(proposals.dtype)), dim=1)
        candidate_valid = torch.cat((proposal_valid, gt_valid), dim=1)
        iou = box_ops.box_iou(candidates, gt_boxes)
        labels, matched = label_proposals(iou, gt_valid, cfg.fg_thresh, cfg.bg_thresh_hi,
                                          cfg.bg_thresh_lo)
        labels = labels.masked_fill(~candidate_valid, IGNORE)
        index, sampled = sample_balanced(labels, cfg.batch_size_per_im, cfg.fg_fraction)
        rois = candidates.gather(1, index[..., None].expand(-1, -1, 4))
        roi_gt = matched.gather(1, index)
        valid = sampled >= 0
        positive = sampled == FOREGROUND
        num_valid = valid.sum().clamp(min=1)

        class_logits, box_deltas = self.box_forward(features, rois)
        target_classes = torch.where(positive, gt_classes.gather(1, roi_gt), 0).reshape(-1)
        class_loss = (F.cross_entropy(class_logits.float(), target_classes, reduction="none")
                      * valid.reshape(-1)).sum() / num_valid

        target_boxes = gt_boxes.gather(1, roi_gt[..., None].expand(-1, -1, 4))
        box_targets = box_ops.encode_boxes(target_boxes, rois, self.box_weights).reshape(-1, 4)
        box_deltas = box_deltas.reshape(-1, self.num_classes, 4)
        pred = box_deltas[torch.arange(box_deltas.shape[0], device=box_deltas.device),
                          target_classes].float()
        box_loss = (F.smooth_l1_loss(pred, box_targets, beta=SMOOTH_L1_BETA, reduction="none")
                    .sum(-1) * positive.reshape(-1)).sum() / num_valid
        losses = {"fast_rcnn_class_loss": class_loss,
                  "fast_rcnn_box_loss": box_loss * cfg.fast_rcnn_box_loss_weight}
        if cfg.include_mask:
            losses["mask_loss"] = self.mask_loss(features, rois, roi_gt, positive, targets)
        return losses

    def mask_loss(self, features, rois, roi_gt, positive, targets) -> Tensor:
        # The sampler puts positives first, so a fixed prefix of the slots holds all of them.
        q = max(1, int(self.cfg.batch_size_per_im * self.cfg.fg_fraction))
        if not torch.compiler.is_compiling() and rois.device.type == "cpu":
            # On the CPU the mask head dominates: run it only on the slots some image fills.
            q = max(1, min(q, int(positive.sum(dim=1).max())))
        rois, roi_gt, positive = rois[:, :q], roi_gt[:, :q], positive[:, :q]
        logits = self.mask_forward(features, rois)
        classes = targets["classes"].gather(1, roi_gt).reshape(-1)
        logits = logits[torch.arange(logits.shape[0], device=logits.device), classes]
        mask_targets = project_masks_to_rois(targets["masks"], targets["boxes"], rois, roi_gt,
                                             logits.shape[-1]).reshape(logits.shape)
        per_roi = F.binary_cross_entropy_with_logits(
            logits.float(), mask_targets, reduction="none").mean(dim=(-1, -2))
        # No positive RoI (an image without objects) gives a zero loss, not NaN.
        weight = positive.reshape(-1).float()
        return (per_roi * weight).sum() / weight.sum().clamp(min=1) * self.cfg.mrcnn_weight_loss_mask

    # ---- inference ----
    def detect(self, features, proposals, proposal_valid, image_size) -> dict:
        cfg = self.cfg
        batch, p = proposals.shape[:2]
        num_det = cfg.test_detections_per_image
        class_logits, box_deltas = self.box_forward(features, proposals)
        scores = F.softmax(class_logits.float(), dim=-1).reshape(batch, p, -1)[..., 1:]
        boxes = box_ops.decode_boxes(box_deltas.reshape(batch, p, -1, 4)[:, :, 1:],
                                     proposals[:, :, None, :], self.box_weights)
        boxes = box_ops.clip_boxes(boxes, *image_size)
        classes = torch.arange(1, self.num_classes, device=boxes.device).expand(batch, p, -1)
        scores = scores.masked_fill(~proposal_valid[..., None], 0.0)
        wh = boxes[..., 2:] - boxes[..., :2]
        keep = (scores > cfg.test_score_thresh) & (wh > 1e-2).all(-1)

        out_boxes = boxes.new_zeros((batch, num_det, 4))
        out_scores = scores.new_zeros((batch, num_det))
        out_classes = torch.zeros((batch, num_det), dtype=torch.long, device=boxes.device)
        counts = torch.zeros(batch, dtype=torch.long, device=boxes.device)
        for i in range(batch):
            sel = keep[i].nonzero(as_tuple=True)
            b, s, c = boxes[i][sel], scores[i][sel], classes[i][sel]
            kept = batched_nms(b, s, c, cfg.test_nms)[:num_det]
            n = kept.numel()
            out_boxes[i, :n], out_scores[i, :n], out_classes[i, :n] = b[kept], s[kept], c[kept]
            counts[i] = n
        result = {"boxes": out_boxes, "scores": out_scores, "classes": out_classes,
                  "num_detections": counts}
        if cfg.include_mask:
            logits = self.mask_forward(features, out_boxes)
            r = logits.shape[-1]
            logits = logits.reshape(batch, num_det, self.num_classes, r, r)
            index = out_classes[:, :, None, None, None].expand(-1, -1, 1, r, r)
            result["masks"] = logits.gather(2, index)[:, :, 0].float().sigmoid()
        return result


