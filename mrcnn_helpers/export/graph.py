"""The Mask R-CNN inference path as one static ONNX graph, for ONNX Runtime / TensorRT / DeepStream.

Why a graph of its own rather than tracing `MaskRCNN.forward`: the model's inference is batched
at fixed sizes, but two of its stages are built for PyTorch on a GPU, not for a static graph:
NMS (model/nms.py) is a batched fixed point iterated until it converges, a loop whose trip count
depends on the data, and multilevel RoIAlign groups the boxes by FPN level with counts read on the
host. Neither can be written into ONNX as it is; ONNX has NonMaxSuppression for the first and a
static formulation for the second. Here every tensor has a shape fixed at export time:

- candidates that the model would drop before NMS get the score -1 instead, and ONNX
  `NonMaxSuppression` is given a score threshold (-0.5) that removes exactly those;
- the variable-length NMS result is turned back into a fixed-size one by scattering it into a
  0/1 mask over the candidates and taking `TopK` of the masked scores with a constant k; slots
  beyond the kept count come out with the sentinel score and are zeroed;
- multilevel RoIAlign runs every RoI on every FPN level and picks the right level with `Where`.

Everything else is the model's own submodules (backbone, rpn.head, box/mask heads) and its pure
functions (anchors, box coding, the FPN level rule, the network identity check), so the exported
graph computes what `model(images)` computes; tests/test_export.py holds the two to 1e-3 of the
image size on boxes. The graph holds standard ONNX ops only (Conv, TopK, Gather, RoiAlign,
NonMaxSuppression, ScatterElements, Where, ...).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from mrcnn_helpers.model import box_ops
from mrcnn_helpers.model.anchors import generate_anchors
from mrcnn_helpers.model.maskrcnn import PIXEL_MEAN, PIXEL_STD
from mrcnn_helpers.model.roi_heads import BOX_POOL_SIZE, assign_roi_levels
from mrcnn_helpers.model.rpn import RPN_BOX_WEIGHTS
from mrcnn_helpers.spec.network import network_differences, network_fields_of_model

# Candidates the model filters out before NMS carry this score; NMS drops scores <= -0.5 and
# TopK ranks them last, so they never reach an output (real scores are probabilities >= 0).
DROPPED = -1.0
NMS_SCORE_THRESHOLD = -0.5

LAYOUTS = ("deepstream", "compact")
DEEPSTREAM_OUTPUTS = ("generate_detections", "mask_fcn_logits/BiasAdd")
COMPACT_OUTPUTS = ("boxes", "scores", "classes", "masks", "num_detections")
INPUT_NAME = "Input"
# DeepStream normalizes with one scalar: y = net_scale_factor * (x - offsets[c]). TLT used
# 1 / 57.12 (0.017507); the per-channel std of the model is folded into conv1 (see
# fold_input_scale), so any scalar works and this one keeps TLT's value.
NET_SCALE_FACTOR = 1.0 / PIXEL_STD[1]


def output_names(layout: str) -> tuple[str, ...]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return DEEPSTREAM_OUTPUTS if layout == "deepstream" else COMPACT_OUTPUTS


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression (opset >= 11) with its score threshold and per-class output cap.

    boxes float [N, S, 4] (x1, y1, x2, y2); scores float [N, K, S] (K classes sharing the boxes).
    For each (batch n, class k): boxes with score > score_threshold, greedy NMS at iou_threshold
    (suppress IoU > threshold), the first max_output by score. Returns int64 [M, 3] rows
    (n, k, box index). The eager forward (used while tracing and in PyTorch runs of the wrapper)
    loops with torchvision's nms; the exported node is the standard ONNX op.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_output: int, iou_threshold: float, score_threshold: float):
        rows = []
        for n in range(boxes.shape[0]):
            for k in range(scores.shape[1]):
                candidates = (scores[n, k] > score_threshold).nonzero().squeeze(1)
                keep = candidates[nms(boxes[n, candidates], scores[n, k, candidates],
                                      iou_threshold)[:max_output]]
                rows.append(torch.stack((torch.full_like(keep, n), torch.full_like(keep, k), keep),
                                        dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([int(max_output)], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([float(iou_threshold)])),
                    g.op("Constant", value_t=torch.tensor([float(score_threshold)])),
                    center_point_box_i=0)


def static_nms_topk(boxes: Tensor, scores: Tensor, k: int, iou_threshold: float,
                    max_per_class: int) -> tuple[Tensor, Tensor]:
    """NMS with a fixed-size result: the k best survivors of each image, sorted by score.

    boxes [B, G, S, 4] and scores [B, G, S]: G independent groups (FPN levels, classes) per image,
    each NMS'd on its own; scores <= NMS_SCORE_THRESHOLD never survive. Returns (values [B, k],
    indices [B, k] into the flattened G * S candidates); slots past the survivor count hold
    DROPPED (their indices are arbitrary).
    """
    batch, groups, size = scores.shape
    selected = _NonMaxSuppression.apply(boxes.reshape(batch * groups, size, 4),
                                        scores.reshape(batch * groups, 1, size),
                                        max_per_class, iou_threshold, NMS_SCORE_THRESHOLD)
    # (batch * groups) rows are (image, group) pairs, so row * S + box indexes scores.reshape(-1).
    flat = selected[:, 0] * size + selected[:, 2]
    kept = torch.zeros(batch * groups * size, dtype=scores.dtype, device=scores.device)
    kept = kept.scatter(0, flat, torch.ones_like(flat, dtype=scores.dtype))
    masked = torch.where(kept.reshape(batch, groups * size) > 0, scores.reshape(batch, -1),
                         torch.full_like(scores.reshape(batch, -1), DROPPED))
    return masked.topk(k, dim=1)


class ExportableMaskRCNN(nn.Module):
    """Fixed-shape Mask R-CNN inference for export, built from a trained `MaskRCNN`.

    Input: float Tensor[batch_size, 3, H, W], RGB; with normalize_in_graph the raw 0..255 pixel
    values (padded image as resize_and_pad makes it), otherwise DeepStream's normalization
    already applied: NET_SCALE_FACTOR * (pixel - PIXEL_MEAN[c]) (the per-channel std is folded
    into a copy of conv1). The given model is not modified (the wrapper holds a CPU deep copy;
    it is meant for tracing on the CPU).

    cfg: the MaskRCNNConfig whose inference settings (top-n, thresholds, detections per image)
    are baked into the graph; None = the model's own. Its network fields must be the model's.

    Outputs (D = test_detections_per_image, C = num_classes incl. background, R =
    mrcnn_resolution), rows sorted by score, rows past the detection count all zero:
      layout "deepstream": generate_detections float [B, D, 6] = (y1, x1, y2, x2, class, score)
        in input pixels; mask_fcn_logits/BiasAdd float [B, D, C, R, R] raw mask logits.
      layout "compact": boxes float [B, D, 4] (x1, y1, x2, y2) input pixels; scores float
        [B, D]; classes int32 [B, D] (0 = padding); masks float [B, D, R, R] probabilities of the
        predicted class; num_detections int32 [B].
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int], *, cfg=None,
                 batch_size: int = 1, layout: str = "deepstream", normalize_in_graph: bool = True):
        super().__init__()
        output_names(layout)  # validates
        cfg = model.cfg if cfg is None else cfg
        check_same_network(model.cfg, cfg)
        if not cfg.include_mask:
            raise ValueError("export needs a model with a mask head (include_mask: true)")
        model = copy.deepcopy(model).cpu().float().eval()
        self.cfg = cfg
        self.layout = layout
        self.batch_size = int(batch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_classes = int(model.num_classes)
        self.normalize_in_graph = bool(normalize_in_graph)
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        heads = model.roi_heads
        self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
        self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor
        self.roi_levels = heads.roi_levels
        self.box_weights = heads.box_weights
        self.mask_pool_size = heads.mask_pool_size
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1))
        if not self.normalize_in_graph:
            fold_input_scale(self.backbone.body["conv1"], NET_SCALE_FACTOR)
        # Anchors depend on the fixed input size only: constants of the graph.
        levels = range(cfg.min_level, cfg.max_level + 1)
        # Every conv / pool of the backbone rounds up: level l is ceil(size / 2**l).
        height, width = self.image_size
        self.feature_sizes = [(-(-height // 2 ** lvl), -(-width // 2 ** lvl)) for lvl in levels]
        anchors = generate_anchors(self.feature_sizes, [2 ** lvl for lvl in levels],
                                   cfg.anchor_scale, cfg.num_scales, cfg.aspect_ratios)
        per_level = [h * w * self.rpn_head.cls_logits.out_channels for h, w in self.feature_sizes]
        for i, chunk in enumerate(anchors.split(per_level)):
            self.register_buffer(f"anchors_{i}", chunk)
        self.per_level = per_level

    # ---- stages ----
    def propose(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Proposals [B, P, 4] (zeros where invalid) and valid [B, P], as rpn.propose."""
        cfg, batch = self.cfg, self.batch_size
        logits, deltas = self.rpn_head(features)
        boxes, probs, level_ids = [], [], []
        for level, (obj, delta) in enumerate(zip(logits, deltas)):
            obj = obj.permute(0, 2, 3, 1).reshape(batch, -1)
            delta = delta.permute(0, 2, 3, 1).reshape(batch, -1, 4)
            k = min(cfg.test_rpn_pre_nms_topn, self.per_level[level])
            top, idx = obj.topk(k, dim=1)
            anchors = getattr(self, f"anchors_{level}")[idx]
            decoded = box_ops.decode_boxes(delta.gather(1, idx[..., None].expand(batch, k, 4)),
                                           anchors, RPN_BOX_WEIGHTS)
            boxes.append(box_ops.clip_boxes(decoded, *self.image_size))
            probs.append(top.float().sigmoid())
            level_ids += [level] * k
        boxes, probs = torch.cat(boxes, dim=1), torch.cat(probs, dim=1)
        wh = boxes[..., 2:] - boxes[..., :2]
        keep = (wh > max(cfg.rpn_min_size, 1e-3)).all(dim=-1)
        # One NMS group per level (the model's batched_nms over levels): a box's score is in its
        # own level's row and DROPPED in the others.
        num_levels, size = len(self.per_level), boxes.shape[1]
        in_level = torch.tensor(level_ids)[None] == torch.arange(num_levels)[:, None]  # [L, N]
        scores = torch.where(in_level[None] & keep[:, None], probs[:, None],
                             torch.full((batch, num_levels, size), DROPPED))
        k = min(cfg.test_rpn_post_nms_topn, size)
        values, index = static_nms_topk(boxes[:, None].expand(batch, num_levels, size, 4), scores,
                                        k, cfg.test_rpn_nms_thresh, k)
        valid = values > NMS_SCORE_THRESHOLD
        index = index % size
        proposals = boxes.gather(1, index[..., None].expand(batch, k, 4))
        proposals = proposals * valid[..., None].to(boxes.dtype)
        return proposals, valid

    def roi_align_levels(self, features: list[Tensor], boxes: Tensor, size: int) -> Tensor:
        """multilevel_roi_align with static shapes: every level pooled, the right one selected."""
        batch, k = boxes.shape[:2]
        flat = boxes.reshape(batch * k, 4)
        image_index = torch.arange(batch).repeat_interleave(k).to(flat.dtype)
        rois = torch.cat((image_index[:, None], flat), dim=1)
        levels = assign_roi_levels(flat, *self.roi_levels)
        out = None
        for offset, level in enumerate(range(self.roi_levels[0], self.roi_levels[1] + 1)):
            pooled = roi_align(features[offset], rois, (size, size), spatial_scale=1.0 / 2 ** level,
                               sampling_ratio=2, aligned=False)
            out = pooled if out is None else torch.where(
                (levels == level)[:, None, None, None], pooled, out)
        return out

    def detect(self, features: list[Tensor], proposals: Tensor, valid: Tensor):
        """Detections as roi_heads.detect: boxes [B, D, 4], scores [B, D], classes int64 [B, D],
        found bool [B, D]."""
        cfg, batch = self.cfg, self.batch_size
        p, c = proposals.shape[1], self.num_classes
        class_logits, box_deltas = self.box_predictor(
            self.box_head(self.roi_align_levels(features, proposals, BOX_POOL_SIZE)))
        scores = F.softmax(class_logits.float(), dim=-1).reshape(batch, p, c)[..., 1:]
        boxes = box_ops.decode_boxes(box_deltas.reshape(batch, p, c, 4)[:, :, 1:],
                                     proposals[:, :, None, :], self.box_weights)
        boxes = box_ops.clip_boxes(boxes, *self.image_size)
        scores = scores * valid[..., None].to(scores.dtype)
        wh = boxes[..., 2:] - boxes[..., :2]
        keep = (scores > cfg.test_score_thresh) & (wh > 1e-2).all(-1)
        scores = torch.where(keep, scores, torch.full_like(scores, DROPPED))
        # Groups = foreground classes: [B, C-1, P] so each class is NMS'd on its own boxes.
        boxes = boxes.permute(0, 2, 1, 3)
        scores = scores.permute(0, 2, 1)
        num_det = cfg.test_detections_per_image
        k = min(num_det, (c - 1) * p)
        values, index = static_nms_topk(boxes, scores, k, cfg.test_nms, k)
        found = values > NMS_SCORE_THRESHOLD
        det_boxes = boxes.reshape(batch, -1, 4).gather(1, index[..., None].expand(batch, k, 4))
        det_boxes = det_boxes * found[..., None].to(det_boxes.dtype)
        det_scores = values * found.to(values.dtype)
        det_classes = (index // p + 1) * found.to(index.dtype)
        if k < num_det:  # fewer candidates than output rows: pad with zero rows
            pad = num_det - k
            det_boxes = torch.cat((det_boxes, det_boxes.new_zeros((batch, pad, 4))), dim=1)
            det_scores = torch.cat((det_scores, det_scores.new_zeros((batch, pad))), dim=1)
            det_classes = torch.cat((det_classes, det_classes.new_zeros((batch, pad))), dim=1)
            found = torch.cat((found, found.new_zeros((batch, pad))), dim=1)
        return det_boxes, det_scores, det_classes, found

    def forward(self, images: Tensor):
        x = images.float()
        if self.normalize_in_graph:
            x = (x - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        proposals, valid = self.propose(features)
        boxes, scores, classes, found = self.detect(features, proposals, valid)
        batch, num_det = boxes.shape[:2]
        logits = self.mask_predictor(self.mask_head(
            self.roi_align_levels(features, boxes, self.mask_pool_size)))
        r = logits.shape[-1]
        logits = logits.reshape(batch, num_det, self.num_classes, r, r)
        logits = logits * found[:, :, None, None, None].to(logits.dtype)
        if self.layout == "deepstream":
            detections = torch.cat((boxes[..., [1, 0, 3, 2]], classes[..., None].float(),
                                    scores[..., None]), dim=-1)
            return detections, logits
        index = classes[:, :, None, None, None].expand(batch, num_det, 1, r, r)
        masks = logits.gather(2, index)[:, :, 0].sigmoid()
        masks = masks * found[:, :, None, None].to(logits.dtype)
        return (boxes, scores, classes.to(torch.int32), masks,
                found.sum(dim=1).to(torch.int32))


def check_same_network(model_cfg, cfg, num_classes: int = 0) -> None:
    """ValueError naming the fields where `cfg` describes another network than `model_cfg`
    (spec.network's identity: layers, shapes, anchors, box coding)."""
    differ = network_differences(network_fields_of_model(model_cfg, num_classes),
                                 network_fields_of_model(cfg, num_classes), saved_name="model")
    if differ:
        raise ValueError("the spec describes another network than the model: " + "; ".join(differ))


def fold_input_scale(conv: nn.Conv2d, scale: float) -> None:
    """Make `conv` (the first layer, fed (x - mean) / std) accept scale * (x - mean) instead.

    conv(W, (x - m) / s_c) = conv(W * 1 / (scale * s_c), scale * (x - m)) per input channel c:
    the weights are scaled in place. Zero padding and the bias are unaffected (both are applied
    to the already-normalized input / after the sum).
    """
    std = torch.tensor(PIXEL_STD, dtype=conv.weight.dtype, device=conv.weight.device)
    if conv.weight.shape[1] != std.numel():
        raise ValueError(f"first conv has {conv.weight.shape[1]} input channels, expected 3")
    with torch.no_grad():
        conv.weight.mul_((1.0 / (scale * std)).view(1, -1, 1, 1))
