"""Detections as COCO results: what `mrcnn infer --json` writes and what evaluation scores.

A result is a dict: `image_id`, `category_id` (the dataset's COCO id), `bbox` [x, y, w, h] in
original-image pixels, `score` and, with masks, `segmentation` as compressed RLE with `counts` as
str (so the list can be written as JSON). Masks are encoded with pycocotools in one call per
image.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _column_major_stack(masks) -> np.ndarray:
    """[N, h, w] masks as the uint8 column-major [h, w, N] stack pycocotools encodes in one call.

    Column-major [h, w, N] is row-major [N, w, h]: one transposing copy (done by torch, on all
    cores, for tensors; bool is reinterpreted as uint8 without a copy) and a free view.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach()
        masks = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)
        return masks.transpose(1, 2).contiguous().cpu().numpy().transpose(2, 1, 0)
    masks = np.asarray(masks)
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else masks.astype(np.uint8)
    return np.asfortranarray(masks.transpose(1, 2, 0))


def detections_to_coco_results(image_id: int, boxes, scores, classes, masks=None,
                               category_ids=None) -> list[dict]:
    """COCO result dicts of one image's detections.

    boxes: Tensor/array[N, 4] (x1, y1, x2, y2) in original-image pixels; scores: [N];
    classes: int [N] contiguous labels 1..K; masks: bool [N, h, w] at original resolution, or None
    (then no `segmentation` key). category_ids: COCO id of each contiguous label, index i-1 for
    label i (the dataset's `category_ids`); None keeps the contiguous label as the id.
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation"?}].
    """
    boxes = _as_numpy(boxes).astype(np.float64).reshape(-1, 4)
    scores = _as_numpy(scores).astype(np.float64).reshape(-1)
    classes = _as_numpy(classes).astype(np.int64).reshape(-1)
    n = boxes.shape[0]
    if scores.shape[0] != n or classes.shape[0] != n:
        raise ValueError(f"boxes ({n}), scores ({scores.shape[0]}) and classes "
                         f"({classes.shape[0]}) must have one row per detection")
    if category_ids is not None:
        bad = classes[(classes < 1) | (classes > len(category_ids))]
        if bad.size:
            raise ValueError(f"class label {int(bad[0])} has no COCO category: labels must be in "
                             f"1..{len(category_ids)} (category_ids has {len(category_ids)} ids)")
    rles = []
    if masks is not None and n:
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be [N={n}, h, w], got shape {tuple(masks.shape)}")
        rles = mask_utils.encode(_column_major_stack(masks))
    results = []
    for i in range(n):
        x1, y1, x2, y2 = boxes[i].tolist()
        label = int(classes[i])
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]) if category_ids is not None else label,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if rles:
            rle = rles[i]
            counts = rle["counts"]
            result["segmentation"] = {
                "size": [int(s) for s in rle["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
        results.append(result)
    return results
