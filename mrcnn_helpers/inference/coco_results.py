"""Detections as COCO results: what `mrcnn infer --json` writes and what evaluation scores.

A result is a dict: `image_id`, `category_id` (the dataset's COCO id), `bbox` [x, y, w, h] in
original-image pixels, `score` and, with masks, `segmentation` as compressed RLE with `counts` as
str (so the list can be written as JSON).

Masks are encoded from their occupied region only: the rows and columns a mask occupies are found
by two vectorized reductions over the whole stack (on the masks' device), and the run lengths of
the column-major RLE are read from the transitions inside that region; pycocotools then only
compresses the counts. A detection's mask covers a small part of the image, so this reads each
full-resolution mask once instead of walking every pixel of it in pycocotools' encoder, and the
result is byte-identical to `pycocotools.mask.encode` of the full mask (tested). Masks on a GPU
are read there (`mask_runs`): the run boundaries of the whole stack are found in two passes and
only they cross to the host, not the masks (100 masks at 832x1344 are 110 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from mrcnn_helpers.visualize import mask_extents


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def rle_counts(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Uncompressed column-major RLE counts (zeros first) of an image of height x width that is
    zero except for bool `crop` placed at (y0, x0)."""
    hh, ww = crop.shape
    padded = np.zeros((ww, hh + 2), dtype=np.int8)
    padded[:, 1:-1] = crop.T
    cols, rows = np.nonzero(np.diff(padded, axis=1))
    changes = (x0 + cols) * height + (y0 + rows)
    # A run reaching the bottom of one column and one starting at the top of the next meet at
    # the same index when the crop spans the whole height: the run goes on, drop both.
    joined = np.flatnonzero(changes[1:] == changes[:-1])
    if joined.size:
        changes = np.delete(changes, np.concatenate([joined, joined + 1]))
    if changes.size and changes[-1] == height * width:
        changes = changes[:-1]  # a run that ends at the last pixel: no empty run after it
    return np.diff(np.concatenate([[0], changes, [height * width]]))


@dataclass
class MaskRuns:
    """The uncompressed column-major RLE counts (zeros first) of N masks of height x width."""

    counts: list
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.counts)


def mask_runs(masks: torch.Tensor) -> MaskRuns:
    """MaskRuns of bool masks [N, h, w], computed where the masks are: the column-major stack
    compared with itself shifted by one pixel, the positions where it changes copied to the host.
    Meant for masks on a GPU (on the CPU, encode_masks' region reading is faster)."""
    n, height, width = (int(v) for v in masks.shape)
    flat = masks.detach().transpose(1, 2).reshape(n, height * width)
    changes = torch.empty_like(flat)
    changes[:, :1] = flat[:, :1]  # a mask that starts with a run of ones: a zero-length first run
    torch.ne(flat[:, 1:], flat[:, :-1], out=changes[:, 1:])
    index, positions = torch.nonzero(changes, as_tuple=True)
    per_mask = torch.bincount(index, minlength=n).cpu().numpy()
    positions = positions.cpu().numpy()
    total = np.array([height * width])
    counts = [np.diff(np.concatenate(([0], p, total)))
              for p in np.split(positions, np.cumsum(per_mask)[:-1])] if n else []
    return MaskRuns(counts, height, width)


def encode_masks(masks) -> list[dict]:
    """pycocotools' compressed RLE ({"size": [h, w], "counts": bytes}) of each mask of bool
    [N, h, w] (tensor or array), read from the region each mask occupies, or of MaskRuns."""
    if isinstance(masks, MaskRuns):
        uncompressed = [{"counts": c.tolist(), "size": [masks.height, masks.width]}
                        for c in masks.counts]
        return (mask_utils.frPyObjects(uncompressed, masks.height, masks.width)
                if uncompressed else [])
    n, height, width = masks.shape
    extents = mask_extents(masks)
    if isinstance(masks, torch.Tensor):
        masks = masks.detach()
    uncompressed = []
    for i in range(n):
        y0, y1, x0, x1 = extents[i]
        crop = masks[i, y0:y1, x0:x1]
        crop = crop.cpu().numpy() if isinstance(crop, torch.Tensor) else np.asarray(crop)
        counts = rle_counts(crop.astype(bool, copy=False), int(y0), int(x0), height, width)
        uncompressed.append({"counts": counts.tolist(), "size": [height, width]})
    return mask_utils.frPyObjects(uncompressed, height, width) if uncompressed else []


def detections_to_coco_results(image_id: int, boxes, scores, classes, masks=None,
                               category_ids=None) -> list[dict]:
    """COCO result dicts of one image's detections.

    boxes: Tensor/array[N, 4] (x1, y1, x2, y2) in original-image pixels; scores: [N];
    classes: int [N] contiguous labels 1..K; masks: bool [N, h, w] at original resolution, their
    MaskRuns, or None (then no `segmentation` key). category_ids: COCO id of each contiguous label, index i-1 for
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
    if isinstance(masks, MaskRuns):
        if len(masks) != n:
            raise ValueError(f"masks must have one run list per detection ({n}), got {len(masks)}")
        rles = encode_masks(masks)
    elif masks is not None and n:
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be [N={n}, h, w], got shape {tuple(masks.shape)}")
        rles = encode_masks(masks)
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
