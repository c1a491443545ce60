"""The files of `mrcnn evaluate --save-dir DIR`, from one run_evaluation:

- `metrics.json`: the metrics evaluate_model returns (the scalars and the per-class AP);
- `pr_curves.png`: precision/recall per class at IoU 0.50 and over 0.50:0.95, from COCOeval's
  precision array (masks; boxes for a model without masks);
- `confusion_matrix.png`: the detections scoring >= the threshold matched to the ground truth
  by IoU >= 0.5 (mask IoU, box IoU without masks), classes plus background, as counts;
- `predictions.png`: the first few evaluated images, the detections scoring >= the threshold
  next to the ground truth (visualize.draw_instances).

Every file is written atomically. Without matplotlib only metrics.json is written, with a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_helpers.data.images import load_image
from mrcnn_helpers.evaluate import Evaluation, write_metrics_json
from mrcnn_helpers.evaluate.analysis import confusion_matrix, pr_curves
from mrcnn_helpers.evaluate.plots import (
    confusion_matrix_figure,
    pr_curves_figure,
    predictions_figure,
)
from mrcnn_helpers.plotting import matplotlib_missing, save_png
from mrcnn_helpers.visualize import draw_instances

METRICS_FILE = "metrics.json"
PR_CURVES_PNG = "pr_curves.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
PREDICTIONS_PNG = "predictions.png"
PREDICTION_IMAGES = 4  # images in predictions.png
IOU_THRESHOLD = 0.5    # of the confusion matrix
DRAW_WIDTH = 480       # px: narrower images are enlarged (by a whole factor) before drawing


def class_names_of(dataset) -> list[str]:
    """The dataset's category names in `category_ids` order (no background)."""
    cats = dataset.coco.cats
    return [str(cats[c]["name"]) if c in cats else str(c) for c in dataset.category_ids]


def _iou_type(evaluation: Evaluation) -> str:
    """"segm" when masks were evaluated (every detection then has one), else "bbox"."""
    if "segm" in evaluation.coco_evals:
        return "segm"
    return "segm" if not evaluation.results and "mask_AP" in evaluation.metrics else "bbox"


def _drawing(image, items: list[dict], scores, label_of: dict[int, int], names: list[str],
             mask_of: Callable[[dict], np.ndarray] | None, every: bool):
    """`image` (uint8 [3, h, w]) with COCO annotations or result dicts (`items`) drawn by
    draw_instances (every instance, or as `mrcnn infer` draws: second drawings of an object left
    out); an image narrower than DRAW_WIDTH is enlarged by a whole factor first (pixels
    repeated), so that its labels are drawn large enough to read."""
    factor = max(1, DRAW_WIDTH // int(image.shape[-1]))
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (i["bbox"] for i in items)],
                     dtype=np.float64).reshape(-1, 4) * factor
    classes = np.array([label_of[int(i["category_id"])] for i in items], dtype=np.int64)
    masks = None
    if mask_of is not None:
        height, width = (int(n) * factor for n in image.shape[1:])
        masks = np.zeros((len(items), height, width), dtype=bool)
        for k, item in enumerate(items):
            mask = mask_of(item).astype(bool)
            masks[k] = mask.repeat(factor, axis=0).repeat(factor, axis=1)
    if factor > 1:
        image = image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return draw_instances(image, boxes, scores, classes, names, masks=masks,
                          **({"duplicate_overlap": None} if every else {}))


def prediction_panels(evaluation: Evaluation, *, score_threshold: float,
                      num_images: int = PREDICTION_IMAGES) -> list[tuple]:
    """(prediction title, drawn prediction, ground-truth title, drawn ground truth) of the first
    `num_images` evaluated images (read from the dataset's image_dir). Detections scoring below
    score_threshold are left out, and so are second drawings of an object (as `mrcnn infer`
    draws them); every ground truth instance is drawn."""
    dataset = evaluation.dataset
    coco = dataset.coco
    names = ["background"] + class_names_of(dataset)
    label_of = {int(c): k + 1 for k, c in enumerate(dataset.category_ids)}
    with_masks = _iou_type(evaluation) == "segm"
    panels = []
    for image_id in evaluation.image_ids[:num_images]:
        info = coco.imgs[image_id]
        image = load_image(Path(dataset.image_dir) / info["file_name"], image_id)
        dets = [r for r in evaluation.results if int(r["image_id"]) == image_id
                and r["score"] >= score_threshold and int(r["category_id"]) in label_of]
        gts = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
               if int(a["category_id"]) in label_of]
        predicted = _drawing(image, dets, [r["score"] for r in dets], label_of, names,
                             (lambda r: mask_utils.decode(r["segmentation"])) if with_masks
                             else None, every=False)
        truth = _drawing(image, gts, None, label_of, names,
                         coco.annToMask if with_masks else None, every=True)
        name = info.get("file_name", str(image_id))
        panels.append((f"prediction: {name}, {len(dets)} scoring >= {score_threshold:g}",
                       predicted, f"ground truth: {name}, {len(gts)} instances", truth))
    return panels


def write_evaluation_artifacts(evaluation: Evaluation, save_dir: str | os.PathLike, *,
                               score_threshold: float = 0.5,
                               num_images: int = PREDICTION_IMAGES,
                               note: Callable[[str], None] = print) -> list[Path]:
    """Write the files of the module doc into `save_dir` (created); returns their paths.

    score_threshold: of the confusion matrix and predictions.png. note: receives the one-line
    notes (matplotlib missing; no image folder to draw predictions from). Raises MrcnnError
    naming the file that cannot be written.
    """
    save_dir = Path(save_dir)
    written = [write_metrics_json(evaluation.metrics, save_dir / METRICS_FILE)]
    missing = matplotlib_missing()
    if missing is not None:
        note(f"note: plots not written: {missing}")
        return written
    dataset = evaluation.dataset
    names = class_names_of(dataset)
    iou_type = _iou_type(evaluation)
    what = "mask" if iou_type == "segm" else "box"
    coco_eval = evaluation.coco_evals.get(iou_type)
    curves = pr_curves(coco_eval) if coco_eval is not None else _no_curves(dataset.category_ids)
    cats = dataset.coco.cats
    labels = {int(c): k + 1 for k, c in enumerate(dataset.category_ids)}
    written.append(save_png(pr_curves_figure(
        curves, [str(cats.get(c, {}).get("name", c)) for c in curves["category_ids"]],
        [labels.get(c, k + 1) for k, c in enumerate(curves["category_ids"])], what),
        save_dir / PR_CURVES_PNG))
    counts = confusion_matrix(dataset.coco, evaluation.results, evaluation.image_ids,
                              dataset.category_ids, score_threshold=score_threshold,
                              iou_threshold=IOU_THRESHOLD, iou_type=iou_type)
    subtitle = f"score >= {score_threshold:g}, {what} IoU >= {IOU_THRESHOLD:g}"
    written.append(save_png(confusion_matrix_figure(counts, names, subtitle),
                            save_dir / CONFUSION_MATRIX_PNG))
    if getattr(dataset, "image_dir", None):
        panels = prediction_panels(evaluation, score_threshold=score_threshold,
                                   num_images=num_images)
        written.append(save_png(predictions_figure(panels), save_dir / PREDICTIONS_PNG))
    else:
        note(f"note: {PREDICTIONS_PNG} not written: the validation set has no image folder "
             "(TFRecords) to draw from")
    return written


def _no_curves(category_ids) -> dict:
    """pr_curves' shape without a curve (no detections: COCOeval ran on nothing)."""
    recall = np.linspace(0.0, 1.0, 101)
    empty = np.full((len(category_ids), recall.size), np.nan)
    none = [None] * len(category_ids)
    return {"recall": recall, "category_ids": [int(c) for c in category_ids],
            "precision50": empty, "precision": empty, "ap50": none, "ap": none}
