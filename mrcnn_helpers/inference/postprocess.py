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
    clipped = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                           boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1)
    # A box lying wholly in the padding clips to zero area: it shows nothing of the image.
    keep = ((scores >= score_threshold) & (classes > 0)
            & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    masks = None
    if include_mask and dets.get("masks") is not None:
        masks = paste_binary_masks(dets["masks"][index, :n][keep].float(), boxes[keep], h, w,
                                   mask_threshold)
        if not masks_on_device:
            masks = masks.cpu()
    return {"boxes": clipped[keep].cpu(), "scores": scores[keep].cpu(),
            "classes": classes[keep].cpu(), "masks": masks}
