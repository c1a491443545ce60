"""Evaluation details for notebooks: COCOeval's precision arrays and per-image error matching.

`evaluate_detailed` runs what `mrcnn_helpers.evaluate.evaluate_model` runs (`run_evaluation`)
but keeps what the summary numbers are made of: the detections and the precision array
[T, R, K] behind precision/recall curves. `match_instances` pairs one image's
predictions with its ground truth, to find missed instances and false positives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from mrcnn_helpers.evaluate import _coco_evaluate, precision_array, run_evaluation


@dataclass
class EvalResult:
    """What `evaluate_detailed` measured.

    metrics: the dict `coco_evaluate` returns (AP, ..., mask_AP, ..., per_class) plus
    eval_images and eval_images_per_sec. results: the COCO result dicts (original-image pixels).
    class_names[k]: name of COCOeval's category k (categories in sorted-id order).
    precision[iou_type]: float array [T, R, K] (iou thresholds x recall thresholds x categories)
    at area "all" and maxDets 100; -1 where a category has no ground truth. Absent for an iou
    type when there were no detections at all.
    """

    metrics: dict
    results: list[dict]
    image_ids: list[int]
    class_names: list[str]
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    precision: dict[str, np.ndarray] = field(default_factory=dict)



def coco_precision(coco_gt, results: list[dict], image_ids, iou_types=("bbox", "segm")):
    """(metrics, precision by iou type, iou thresholds [T], recall thresholds [R]).

    One COCOeval run per iou type (the evaluation's own, kept) gives both the summary metrics
    (coco_evaluate's numbers, the no-detection case included) and the precision array at area
    "all" and 100 detections; no array for an iou type where nothing was evaluated.
    """
    defaults = COCOeval(iouType="bbox").params
    metrics, evals = _coco_evaluate(coco_gt, results, iou_types, image_ids, verbose=False,
                                    keep=True)
    precision = {iou_type: precision_array(coco_eval) for iou_type, coco_eval in evals.items()}
    return metrics, precision, np.asarray(defaults.iouThrs), np.asarray(defaults.recThrs)


def evaluate_detailed(model, spec, *, device=None, max_images=None,
                      progress: bool = True) -> EvalResult:
    """COCO evaluation of `model` on the spec's validation split, keeping the details.

    Same images, preprocessing, post-processing and metrics as `evaluate_model(model, spec,
    device=..., max_images=...)`; additionally returns the detections and precision arrays (see
    EvalResult). The model's train/eval mode is restored afterwards.
    """
    evaluation = run_evaluation(model, spec, device=device, max_images=max_images,
                                progress=progress)
    coco = evaluation.dataset.coco
    defaults = COCOeval(iouType="bbox").params
    class_names = [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    return EvalResult(metrics=evaluation.metrics, results=evaluation.results,
                      image_ids=evaluation.image_ids, class_names=class_names,
                      iou_thresholds=np.asarray(defaults.iouThrs),
                      recall_thresholds=np.asarray(defaults.recThrs),
                      precision={iou_type: precision_array(coco_eval)
                                 for iou_type, coco_eval in evaluation.coco_evals.items()})


def masks_to_rles(masks) -> list[dict]:
    """bool/uint8 masks [N, h, w] (tensor or array) -> N compressed RLEs (pycocotools)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.shape[0] == 0:
        return []
    return list(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))))


def match_instances(gt_rles, gt_classes, dt_rles, dt_classes, dt_scores, *, gt_crowd=None,
                    iou_threshold: float = 0.5) -> dict:
    """Pair one image's detections with its ground truth by mask IoU, as COCO matching does.

    Detections are taken in descending score; each one matches the unmatched, non-crowd ground
    truth instance of the same class with the highest IoU >= iou_threshold. A detection that
    matches nothing but covers a crowd region (IoU >= threshold against it, crowd IoU being
    intersection / detection area) is ignored rather than counted as a false positive.
    gt_rles / dt_rles: compressed RLEs of one size; classes: int labels; dt_scores: floats.
    Returns {"matches": [(dt_index, gt_index, iou)], "missed": [gt indices], "false_positives":
    [dt indices], "ignored": [dt indices]} (indices into the given lists).
    """
    n_gt, n_dt = len(gt_rles), len(dt_rles)
    gt_classes = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
    dt_classes = np.asarray(dt_classes, dtype=np.int64).reshape(-1)
    crowd = (np.zeros(n_gt, dtype=bool) if gt_crowd is None
             else np.asarray(gt_crowd, dtype=bool).reshape(-1))
    if n_gt and n_dt:
        ious = np.asarray(mask_utils.iou(list(dt_rles), list(gt_rles), crowd.astype(np.uint8)
                                         .tolist()), dtype=np.float64).reshape(n_dt, n_gt)
    else:
        ious = np.zeros((n_dt, n_gt))
    order = np.argsort(-np.asarray(dt_scores, dtype=np.float64).reshape(-1), kind="stable")
    taken = np.zeros(n_gt, dtype=bool)
    matches, false_positives, ignored = [], [], []
    for d in order.tolist():
        same = (gt_classes == dt_classes[d]) & ~crowd & ~taken
        candidates = np.where(same, ious[d], -1.0)
        g = int(np.argmax(candidates)) if n_gt else -1
        if n_gt and candidates[g] >= iou_threshold:
            taken[g] = True
            matches.append((d, g, float(candidates[g])))
        elif n_gt and np.any(crowd & (gt_classes == dt_classes[d])
                             & (ious[d] >= iou_threshold)):
            ignored.append(d)
        else:
            false_positives.append(d)
    missed = [g for g in range(n_gt) if not taken[g] and not crowd[g]]
    return {"matches": matches, "missed": missed, "false_positives": sorted(false_positives),
            "ignored": sorted(ignored)}
