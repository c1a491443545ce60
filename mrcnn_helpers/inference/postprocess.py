"""From the model's batched output to one image's detections in its own pixels.

Every consumer of detections (Predictor, evaluation, `mrcnn infer`, export verification, the
deploy pipeline) maps them back with `postprocess_detections`, so evaluation scores exactly what
inference returns and what deployment draws.
"""

from __future__ import annotations

import torch

from mrcnn_helpers.model.masks import paste_binary_masks

MASK_THRESHOLD = 0.5


def postprocess_detections(dets: dict, index: int, scale: float, orig_size, score_threshold: float,
                           include_mask: bool, *, mask_threshold: float = MASK_THRESHOLD,
                           masks_on_device: bool = False) -> dict:
    """One image's detections in original-image pixels.

    dets: the model's eval output for a batch (boxes [B, D, 4] in padded-input pixels, scores
    [B, D], classes [B, D], masks [B, D, R, R] probabilities, num_detections [B]); index: the image
    in the batch; scale: resized / original (from resize_and_pad); orig_size: (h, w).
    Keeps detections with score >= score_threshold and a foreground class. Boxes are divided by
    scale and clipped to the image; masks are pasted into the unclipped box (the mask covers the
    whole predicted box) at (h, w) and thresholded at mask_threshold.
    Returns CPU tensors: boxes float32 [N, 4] (x1, y1, x2, y2), scores float32 [N], classes int64
    [N], masks bool [N, h, w] or None (include_mask False or the model has no mask output);
    masks_on_device: the masks stay where the model computed them (the deploy pipeline draws
    them there).
    """
    h, w = int(orig_size[0]), int(orig_size[1])
    n = int(dets["num_detections"][index])
    boxes = dets["boxes"][index, :n].float() / float(scale)
    scores = dets["scores"][index, :n].float()
    classes = dets["classes"][index, :n].long()
    clipped, keep = _clip_and_keep(boxes, scores, classes, h, w, score_threshold)
    masks = None
    if include_mask and dets.get("masks") is not None:
        masks = paste_binary_masks(dets["masks"][index, :n][keep].float(), boxes[keep], h, w,
                                   mask_threshold)
        if not masks_on_device:
            masks = masks.cpu()
    return {"boxes": clipped[keep].cpu(), "scores": scores[keep].cpu(),
            "classes": classes[keep].cpu(), "masks": masks}


def _clip_and_keep(boxes, scores, classes, h: int, w: int, score_threshold: float):
    """(boxes [..., 4] clipped to the image, which detections are kept): the score threshold, a
    foreground class and some area inside the image (a box lying wholly in the padding clips to
    zero area: it shows nothing of the image)."""
    clipped = torch.stack((boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                           boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)), dim=-1)
    keep = ((scores >= score_threshold) & (classes > 0)
            & (clipped[..., 2] > clipped[..., 0]) & (clipped[..., 3] > clipped[..., 1]))
    return clipped, keep


def postprocess_batch_on_device(dets: dict, scales, orig_size, score_threshold: float,
                                include_mask: bool, *, mask_threshold: float = MASK_THRESHOLD
                                ) -> dict:
    """postprocess_detections for a whole batch of images of one size, left on the model's
    device for drawing there (the deploy pipeline's GPU path), with one host sync.

    Each image's kept detections (the same rule) come best first, padded to N, the most any
    image keeps: boxes float32 [B, N, 4] clipped, scores [B, N], classes int64 [B, N], valid
    bool [B, N] (False: padding; the valid ones of an image are a prefix), masks bool
    [B, N, h, w] or None, counts: int64 [B] on the CPU.
    """
    h, w = int(orig_size[0]), int(orig_size[1])
    scale = torch.as_tensor(scales, dtype=torch.float32, device=dets["boxes"].device)
    boxes = dets["boxes"].float() / scale[:, None, None]
    scores = dets["scores"].float()
    classes = dets["classes"].long()
    clipped, keep = _clip_and_keep(boxes, scores, classes, h, w, score_threshold)
    rank = torch.arange(scores.shape[1], device=scores.device)
    keep &= rank[None] < dets["num_detections"].to(scores.device).long()[:, None]
    # Best first (ties in the model's order, as visualize.draw_instances sorts), kept ones first.
    order = torch.sort(torch.where(keep, scores, -torch.inf), dim=1, descending=True,
                       stable=True).indices
    counts = keep.sum(1).cpu()
    order = order[:, :int(counts.max()) if len(counts) else 0]
    out = {"boxes": clipped.gather(1, order[..., None].expand(-1, -1, 4)),
           "scores": scores.gather(1, order), "classes": classes.gather(1, order),
           "valid": keep.gather(1, order), "counts": counts, "masks": None}
    if include_mask and dets.get("masks") is not None:
        b, n = order.shape
        probs = dets["masks"][torch.arange(b, device=order.device)[:, None], order]
        raw = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        pasted = paste_binary_masks(probs.reshape(b * n, *probs.shape[2:]).float(),
                                    raw.reshape(b * n, 4), h, w, mask_threshold)
        out["masks"] = pasted.reshape(b, n, h, w)
    return out
