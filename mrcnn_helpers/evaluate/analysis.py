"""What the summary numbers are made of: precision/recall curves and a confusion matrix.

`pr_curves` reads the accumulated `COCOeval.eval["precision"]` (faster-coco-eval's or
pycocotools'; nothing here computes AP). `confusion_matrix` counts the detections above a score threshold against the ground truth,
matched one to one by IoU whatever their classes, so a detection of the wrong class lands off the
diagonal rather than as a miss plus a false positive.
"""

from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_helpers.evaluate import precision_array


def _index(values, wanted) -> int:
    values = np.asarray(values, dtype=np.float64)
    found = np.flatnonzero(np.isclose(values, wanted))
    if not found.size:
        raise ValueError(f"{wanted} is not among COCOeval's thresholds {values.tolist()}")
    return int(found[0])


def pr_curves(coco_eval) -> dict:
    """Precision/recall curves per category of an accumulated COCOeval.

    From `eval["precision"]` [T, R, K, A, M] at area "all" and 100 detections (as AP): returns
    {"recall": [R] COCO's recall thresholds (0, 0.01, ..., 1), "category_ids": [K],
    "precision50": [K, R] the precision at IoU 0.50, "precision": [K, R] the mean precision over
    the IoU thresholds 0.50:0.95, "ap50" / "ap": [K] the means of those curves (COCOeval's
    per-class AP50 and AP)}. A category without ground truth (COCOeval's -1) has NaN curves and
    None APs.
    """
    params = coco_eval.params
    p = precision_array(coco_eval).astype(np.float64)  # [T, R, K]
    p = np.where(p > -1, p, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # the mean of an all-NaN slice
        p50 = p[_index(params.iouThrs, 0.5)].T
        mean = np.nanmean(p, axis=0).T
    return {"recall": np.asarray(params.recThrs, dtype=np.float64),
            "category_ids": [int(c) for c in params.catIds],
            "precision50": p50, "precision": mean, "ap50": _means(p50), "ap": _means(mean)}


def _means(curves: np.ndarray) -> list[float | None]:
    return [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in curves]


def _geometry(items: list[dict], iou_type: str) -> list:
    return [item["segmentation"] if iou_type == "segm" else item["bbox"] for item in items]


def _ious(dts: list, gts: list, crowd: list[int]) -> np.ndarray:
    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    return np.asarray(mask_utils.iou(dts, gts, crowd), dtype=np.float64).reshape(len(dts),
                                                                                len(gts))


def confusion_matrix(coco_gt, results: list[dict], image_ids, category_ids, *,
                     score_threshold: float = 0.5, iou_threshold: float = 0.5,
                     iou_type: str = "segm") -> np.ndarray:
    """Counts int [K + 1, K + 1]: rows the ground-truth class, columns the predicted class, both
    in `category_ids` order, index K = background.

    Per image, detections scoring >= score_threshold and the non-crowd ground truth are paired
    one to one by IoU (masks for iou_type "segm", boxes for "bbox"), class-agnostic, highest IoU
    first, pairs below iou_threshold never: a pair counts at [its ground truth, its detection],
    an unpaired ground truth instance at [class, K] (missed), an unpaired detection at [K, class]
    (false positive), unless it covers a crowd region by iou_threshold (then it is ignored, as
    COCOeval does). results: COCO result dicts (`segmentation` RLEs for "segm").
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    column = {int(c): k for k, c in enumerate(category_ids)}
    background = len(column)
    counts = np.zeros((background + 1, background + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_threshold and int(r["category_id"]) in column:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    for image_id in sorted({int(i) for i in image_ids}):
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
                if int(a["category_id"]) in column and not a.get("ignore", 0)]
        gts = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        dts = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        if iou_type == "segm":
            gts_geo = [coco_gt.annToRLE(a) for a in gts]
            crowd_geo = [coco_gt.annToRLE(a) for a in crowds]
        else:
            gts_geo, crowd_geo = _geometry(gts, "bbox"), _geometry(crowds, "bbox")
        dts_geo = _geometry(dts, iou_type)
        ious = _ious(dts_geo, gts_geo, [0] * len(gts))
        pairs = sorted(((ious[d, g], -d, d, g) for d, g in zip(*np.nonzero(
            ious >= iou_threshold), strict=True)), reverse=True)
        used_d, used_g = set(), set()
        for _, _, d, g in pairs:
            if d not in used_d and g not in used_g:
                used_d.add(d)
                used_g.add(g)
                counts[column[int(gts[g]["category_id"])], column[int(dts[d]["category_id"])]] += 1
        crowd_iou = _ious(dts_geo, crowd_geo, [1] * len(crowds))
        for d, det in enumerate(dts):
            if d not in used_d and not (crowds and crowd_iou[d].max() >= iou_threshold):
                counts[background, column[int(det["category_id"])]] += 1
        for g, ann in enumerate(gts):
            if g not in used_g:
                counts[column[int(ann["category_id"])], background] += 1
    return counts
