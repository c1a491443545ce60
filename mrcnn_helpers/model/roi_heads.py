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
from torchvision.ops import roi_align

from . import box_ops, kernels
from .bias_ops import conv_bias_act
from .fused_conv import compute_dtype
from .masks import project_masks_to_rois
from .nms import nms_keep_mask, top_kept
from .rpn import SMOOTH_L1_BETA
from .sampling import FOREGROUND, IGNORE, label_proposals, sample_balanced

if kernels.ENABLED:
    from .kernels.roi_align import multilevel_roi_align_sets_triton

BOX_POOL_SIZE = 7
# RoIs are assigned to FPN levels 2..5 only (P6 feeds the RPN), by the FPN paper's rule.
ROI_MAX_LEVEL = 5
CANONICAL_SIZE, CANONICAL_LEVEL = 224, 4
# Detection runs NMS on this many (box, class) candidates per image at first (see
# select_detections), on the GPU kernels' sync-free path on DEVICE_CANDIDATES.
PRE_NMS_CANDIDATES = 1000
DEVICE_CANDIDATES = 2048


def assign_roi_levels(boxes: Tensor, min_level: int, max_level: int) -> Tensor:
    """FPN level of each box Tensor[..., 4]: floor(4 + log2(sqrt(area) / 224)), clamped."""
    scale = box_ops.box_area(boxes).clamp(min=1e-6).sqrt()
    level = torch.floor(CANONICAL_LEVEL + torch.log2(scale / CANONICAL_SIZE) + 1e-6)
    return level.clamp(min_level, max_level).long()


def multilevel_roi_align(features: list[Tensor], boxes: Tensor, output_size: int, min_level: int,
                         max_level: int, active: Tensor | None = None) -> Tensor:
    """RoIAlign each box on its FPN level.

    features: maps for levels min_level.. (stride 2**level); boxes: Tensor[B, K, 4] input pixels.
    Returns Tensor[B * K, C, output_size, output_size] in box order, in the features' dtype.
    A non-finite box (a diverged model) is never sampled: it pools to zeros, so training stops at
    its non-finite loss instead of reading memory with a NaN index. active (bool [B, K]): only
    those boxes are pooled, the others give zeros (and cost nothing, backward included): the
    fixed-size slots whose result no loss reads.
    """
    return multilevel_roi_align_sets(features, [(boxes, output_size, active)], min_level,
                                     max_level)[0]


def multilevel_roi_align_sets(features: list[Tensor], sets: list[tuple[Tensor, int, Tensor | None]],
                              min_level: int, max_level: int) -> list[Tensor]:
    """multilevel_roi_align of each (boxes, output_size, active) set from the same features. On
    the GPU path the sets share one autograd node, whose backward sums their gradients into
    one map per level (kernels/roi_align.py says what that saves)."""
    num_levels = max_level - min_level + 1
    scales = [1.0 / 2 ** (min_level + i) for i in range(num_levels)]
    prepared = [(*_rois_and_levels(boxes, active, min_level, max_level), size)
                for boxes, size, active in sets]
    if kernels.available(features[0]):
        return multilevel_roi_align_sets_triton(
            features[:num_levels], [(rois, torch.where(sampled, levels, -1), size)
                                    for rois, levels, sampled, size in prepared],
            scales, sampling_ratio=2)
    return [_grouped_roi_align(features, rois, torch.where(sampled, levels, num_levels), scales,
                               size) for rois, levels, sampled, size in prepared]


def _rois_and_levels(boxes: Tensor, active: Tensor | None, min_level: int, max_level: int):
    """(rois [B * K, 5] with the image index first, level offsets [B * K], whether each is
    pooled [B * K]) for boxes Tensor[B, K, 4]."""
    batch, k = boxes.shape[:2]
    flat = boxes.reshape(-1, 4)
    image_index = torch.arange(batch, device=boxes.device).repeat_interleave(k).to(flat.dtype)
    sampled = torch.isfinite(flat).all(dim=1)
    if active is not None:
        sampled = sampled & active.reshape(-1)
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    rois = torch.cat((image_index[:, None], flat), dim=1)
    levels = assign_roi_levels(flat, min_level, max_level) - min_level
    return rois, levels, sampled


def _grouped_roi_align(features, rois, levels, scales, output_size) -> Tensor:
    """torchvision's RoIAlign per level on the boxes of that level (levels == len(scales): zeros).
    Reads the level counts on the host once: the CPU path."""
    num_levels = len(scales)
    order = levels.argsort(stable=True)
    counts = torch.bincount(levels, minlength=num_levels + 1).tolist()
    pooled, start = [], 0
    for offset, count in enumerate(counts):
        if count == 0:
            continue
        idx = order[start:start + count]
        start += count
        if offset == num_levels:
            pooled.append(features[0].new_zeros((count, features[0].shape[1], output_size,
                                                 output_size)))
            continue
        feat = features[offset]
        pooled.append(roi_align(feat, rois[idx].to(feat.dtype), (output_size, output_size),
                                spatial_scale=scales[offset], sampling_ratio=2, aligned=False))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(pooled)[inverse].to(features[0].dtype)


def select_detections(boxes: Tensor, scores: Tensor, classes: Tensor, candidate: Tensor,
                      iou_threshold: float, num_det: int):
    """Per-class NMS, then the num_det best detections of each image, best first.

    boxes [B, N, 4], scores [B, N], classes [B, N] (one row per proposal and class), candidate
    bool [B, N]. Returns (boxes [B, D, 4], scores [B, D], classes [B, D] (0 past the found ones),
    found bool [B, D]) with D = num_det; the same detections as torchvision's per-image
    `batched_nms(...)[:num_det]`.

    NMS runs on the best candidates of each image: exact whenever an image keeps at least num_det
    of them (suppression only comes from higher scores, so kept boxes further down could never
    enter its top num_det). On the CPU the candidate set then grows and NMS runs again (a host
    sync per check). With the GPU kernels the step stays free of host syncs (CUDA-graph
    capturable): one NMS on DEVICE_CANDIDATES candidates per image, exact unless an image has
    more than DEVICE_CANDIDATES - num_det of its best candidates suppressed.
    """
    total = scores.shape[1]
    device_path = kernels.available(boxes)
    k = min(total, max(DEVICE_CANDIDATES if device_path else PRE_NMS_CANDIDATES, num_det))
    masked = scores.masked_fill(~candidate, -1.0)
    while True:
        top_scores, top = masked.topk(k, dim=1)
        top_valid = candidate.gather(1, top)
        top_boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        top_classes = classes.gather(1, top)
        kept = nms_keep_mask(top_boxes, top_scores, top_valid, iou_threshold, groups=top_classes)
        if device_path:
            break
        short = (kept.sum(dim=1) < num_det) & (candidate.sum(dim=1) > k)
        if k == total or not bool(short.any()):
            break
        k = min(total, 4 * k)
    index, out_scores, found = top_kept(top_scores, kept, num_det)
    out_boxes = top_boxes.gather(1, index[..., None].expand(-1, -1, 4)) * found[..., None]
    out_classes = top_classes.gather(1, index) * found
    return out_boxes, out_scores, out_classes, found


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
        return self.box_predictor(self.box_features(pooled))

    def box_features(self, pooled: Tensor) -> Tensor:
        """The box head (torchvision's TwoMLPHead) on pooled Tensor[N, C, P, P]. On channels_last
        maps (the GPU path's RoIAlign writes [N, P, P, C]) the first layer's weight columns are
        reordered to (P, P, C) instead: a 13 MB weight permuted, not the 100 MB activation
        (4096 RoIs at the seed spec) copied to NCHW order, forward and backward."""
        head = self.box_head
        n, c, p = pooled.shape[0], pooled.shape[1], pooled.shape[-1]
        if pooled.dim() != 4 or pooled.is_contiguous() or not pooled.is_contiguous(
                memory_format=torch.channels_last):
            return head(pooled)
        x = pooled.permute(0, 2, 3, 1).reshape(n, p * p * c)
        weight = head.fc6.weight.to(compute_dtype(x, head.fc6.weight))  # cast, then reorder
        weight = weight.reshape(-1, c, p, p).permute(0, 2, 3, 1).reshape(-1, p * p * c)
        x = F.relu(F.linear(x, weight, head.fc6.bias))
        return F.relu(head.fc7(x))

    def mask_forward(self, features: list[Tensor], boxes: Tensor,
                     active: Tensor | None = None) -> Tensor:
        """Mask logits Tensor[B * K, num_classes, R, R] for boxes Tensor[B, K, 4] (only the
        `active` ones pooled, see multilevel_roi_align)."""
        pooled = multilevel_roi_align(features, boxes, self.mask_pool_size, *self.roi_levels,
                                      active=active)
        x = self.mask_features(pooled)
        logits = self.mask_predictor.mask_fcn_logits
        return conv_bias_act(logits, x) if kernels.available(x) else logits(x)

    def mask_features(self, pooled: Tensor) -> Tensor:
        """The mask head and the predictor's deconvolution + ReLU: Tensor[N, 256, R, R] (on CUDA
        the deconvolution's bias and the ReLU are one pass, bias_ops)."""
        x = self.mask_head(pooled)
        deconv = self.mask_predictor.conv5_mask
        if kernels.available(x):
            return conv_bias_act(deconv, x, relu=True)
        return self.mask_predictor.relu(deconv(x))

    def target_class_mask_logits(self, pooled: Tensor, classes: Tensor) -> Tensor:
        """Mask logits Tensor[N, R, R] of one class per RoI (classes Tensor[N]) from the RoIs'
        pooled maps Tensor[N, C, R / 2, R / 2]: what mask_forward(...)[arange, classes] gives,
        without computing the other classes.

        The loss reads one class channel of each RoI's mask logits. The predictor's final 1 x 1
        convolution over every class (91 on COCO: [1024, 91, 28, 28] at the seed spec) and its
        backward are then mostly wasted work; here each RoI's 256 channels are dotted with its
        class's weight row (a batched matrix-vector product), and the gradient reaches the same
        parameters."""
        x = self.mask_features(pooled)
        n, channels, r = x.shape[0], x.shape[1], x.shape[-1]
        conv = self.mask_predictor.mask_fcn_logits
        weight = conv.weight.reshape(conv.weight.shape[0], channels)[classes]   # [N, C_in]
        # [N, R, R, C_in] is a free view of the channels_last maps the GPU path makes.
        pixels = x.permute(0, 2, 3, 1).reshape(n, r * r, channels)
        logits = torch.bmm(pixels, weight[:, :, None].to(pixels.dtype)).reshape(n, r, r)
        return logits + conv.bias[classes][:, None, None].to(logits.dtype)

    def forward(self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor,
                image_size: tuple[int, int], targets: dict | None = None):
        num_levels = self.roi_levels[1] - self.roi_levels[0] + 1
        features = features[:num_levels]
        if not kernels.available(features[0]):
            # torchvision's RoIAlign computes in fp32 on contiguous NCHW maps: convert the levels
            # once here, for both heads (autocast would convert them on every call).
            features = [f.float().contiguous() for f in features]
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

        if cfg.include_mask:
            # Both heads pool the same maps: one RoIAlign node (its backward sums the gradients).
            q = self._mask_slots(positive)
            box_pooled, mask_pooled = multilevel_roi_align_sets(
                features, [(rois, BOX_POOL_SIZE, None),
                           (rois[:, :q], self.mask_pool_size, positive[:, :q])],
                *self.roi_levels)
        else:
            box_pooled = multilevel_roi_align(features, rois, BOX_POOL_SIZE, *self.roi_levels)
        class_logits, box_deltas = self.box_predictor(self.box_features(box_pooled))
        target_classes = torch.where(positive, gt_classes.gather(1, roi_gt), 0)
        target_boxes = gt_boxes.gather(1, roi_gt[..., None].expand(-1, -1, 4))
        box_targets = box_ops.encode_boxes(target_boxes, rois, self.box_weights)
        class_loss, box_loss = fastrcnn_loss(class_logits, box_deltas, target_classes,
                                             box_targets, valid, positive)
        losses = {"fast_rcnn_class_loss": class_loss,
                  "fast_rcnn_box_loss": box_loss * cfg.fast_rcnn_box_loss_weight}
        if cfg.include_mask:
            losses["mask_loss"] = self.mask_loss(mask_pooled, rois[:, :q], roi_gt[:, :q],
                                                 positive[:, :q], targets)
        return losses

    def _mask_slots(self, positive: Tensor) -> int:
        """How many of the first sampled slots the mask head takes: the sampler puts positives
        first, so a fixed prefix holds all of them."""
        q = max(1, int(self.cfg.batch_size_per_im * self.cfg.fg_fraction))
        if not torch.compiler.is_compiling() and positive.device.type == "cpu":
            # On the CPU the mask head dominates: run it only on the slots some image fills.
            q = max(1, min(q, int(positive.sum(dim=1).max())))
        return q

    def mask_loss(self, pooled, rois, roi_gt, positive, targets) -> Tensor:
        """The mask loss of the mask slots' RoIs (pooled maps of the positive ones; the others,
        in the loss with weight 0, are not pooled at all)."""
        classes = targets["classes"].gather(1, roi_gt).reshape(-1)
        logits = self.target_class_mask_logits(pooled, classes)
        mask_targets = project_masks_to_rois(targets["masks"], targets["boxes"], rois, roi_gt,
                                             logits.shape[-1]).reshape(logits.shape)
        return maskrcnn_loss(logits, mask_targets, positive) * self.cfg.mrcnn_weight_loss_mask

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

        out_boxes, out_scores, out_classes, found = select_detections(
            boxes.reshape(batch, -1, 4), scores.reshape(batch, -1), classes.reshape(batch, -1),
            keep.reshape(batch, -1), cfg.test_nms, num_det)
        result = {"boxes": out_boxes, "scores": out_scores, "classes": out_classes,
                  "num_detections": found.sum(dim=1)}
        if cfg.include_mask:
            logits = self.mask_forward(features, out_boxes)
            r = logits.shape[-1]
            logits = logits.reshape(batch, num_det, self.num_classes, r, r)
            index = out_classes[:, :, None, None, None].expand(-1, -1, 1, r, r)
            result["masks"] = logits.gather(2, index)[:, :, 0].float().sigmoid()
        return result


def fastrcnn_loss(class_logits: Tensor, box_deltas: Tensor, target_classes: Tensor,
                  box_targets: Tensor, valid: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Classification and box-regression losses of the box head over sampled RoIs.

    class_logits [B * K, C] and box_deltas [B * K, C * 4] for K RoIs per image; target_classes
    [B, K] (0 = background), box_targets [B, K, 4] encoded against the RoIs; valid / positive
    bool [B, K] (a sampled slot / a foreground one). Returns (cross-entropy over valid slots,
    smooth-L1 of the target class's deltas over positives), both divided by the valid count.
    """
    num_valid = valid.sum().clamp(min=1)
    target_classes = target_classes.reshape(-1)
    class_loss = (F.cross_entropy(class_logits.float(), target_classes, reduction="none")
                  * valid.reshape(-1)).sum() / num_valid
    box_deltas = box_deltas.reshape(target_classes.shape[0], -1, 4)
    pred = box_deltas[torch.arange(box_deltas.shape[0], device=box_deltas.device),
                      target_classes].float()
    box_loss = (F.smooth_l1_loss(pred, box_targets.reshape(-1, 4), beta=SMOOTH_L1_BETA,
                                 reduction="none").sum(-1) * positive.reshape(-1)).sum() / num_valid
    return class_loss, box_loss


def maskrcnn_loss(mask_logits: Tensor, mask_targets: Tensor, positive: Tensor) -> Tensor:
    """Per-pixel binary cross-entropy of the target class's mask logits [N, R, R] against
    mask_targets [N, R, R] in [0, 1], averaged per RoI and over the positive RoIs (bool [N] or
    [B, K]). No positive RoI (an image without objects) gives a zero loss, not NaN."""
    per_roi = F.binary_cross_entropy_with_logits(
        mask_logits.float(), mask_targets, reduction="none").mean(dim=(-1, -2))
    weight = positive.reshape(-1).float()
    return (per_roi * weight).sum() / weight.sum().clamp(min=1)
