"""COCO evaluation: box and mask AP/AR through pycocotools, per-class AP, metric reports.

Metric names are TLT's (`AP`, `AP50`, ..., `ARl` for boxes, the same with a `mask_` prefix for
masks). Every number comes from COCOeval; nothing here re-implements AP. The matching runs in
faster-coco-eval's C++ COCOeval when it is installed (a dependency; the same numbers as
pycocotools', which the tests check, several times faster on large sets), else in pycocotools';
MRCNN_COCOEVAL=pycocotools forces the reference. Both take pycocotools' COCO objects.

`run_evaluation` keeps the detections and COCOeval objects behind the numbers; the `artifacts`
module beside this one turns them into metrics.json, precision/recall curves, a confusion matrix
and a grid of predictions (`mrcnn evaluate --save-dir`).

Detections reach COCO as result dicts: `bbox` [x, y, w, h] in original-image pixels, `score`,
`category_id` (the dataset's COCO id) and `segmentation` (compressed RLE with `counts` as str, so
the list can be written as JSON).
"""

import collections
import contextlib
import io
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mrcnn_helpers.data.loader import build_eval_loader, collate_batch
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.fileio import atomic_write_json
from mrcnn_helpers.inference.coco_results import detections_to_coco_results, mask_runs
from mrcnn_helpers.inference.postprocess import postprocess_detections
from mrcnn_helpers.inference.predictor import as_predictor

# Order of COCOeval.stats for boxes and masks (pycocotools' summarize()).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl")
IOU_TYPE_PREFIX = {"bbox": "", "segm": "mask_"}
# Batches whose detections may wait for the RLE encoder thread of predict_coco_results.
PENDING_BATCHES = 2
METRICS_HEADER = "=========== Metrics ==========="


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Copies of the results fit for one iou type (loadRes mutates what it is given)."""
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    missing = [r for r in results if "segmentation" not in r]
    if missing:
        raise ValueError(f"segm evaluation needs a 'segmentation' in every result; "
                         f"{len(missing)} of {len(results)} have none (image_id "
                         f"{missing[0].get('image_id')}); evaluate iou_types=('bbox',) instead")
    # Without `bbox`, loadRes takes each instance's area from its mask, so small/medium/large
    # for mask AP follow the mask area as in the COCO reference, not the box area.
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def _category_has_gt(coco_gt, cat_id: int, image_ids: list[int]) -> bool:
    if not image_ids:
        return False
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids, catIds=[cat_id]))
    return any(not a.get("iscrowd", 0) and not a.get("ignore", 0) for a in anns)


def precision_array(coco_eval) -> np.ndarray:
    """An accumulated COCOeval's precision [T, R, K] (IoU thresholds x recall points x
    categories) at area "all" and 100 detections, as AP reads it; -1 where a category has no
    ground truth."""
    params = coco_eval.params
    area = params.areaRngLbl.index("all")
    max_det = params.maxDets.index(100) if 100 in params.maxDets else len(params.maxDets) - 1
    return np.array(coco_eval.eval["precision"][:, :, :, area, max_det])


def _per_class_ap(coco_eval: COCOeval) -> dict[int, float | None]:
    """AP per category id: precision at IoU .5:.95, area 'all', maxDets 100, mean over recall
    points; None where COCOeval marks the class absent (-1: no ground truth)."""
    precision = precision_array(coco_eval)
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k]
        p = p[(p > -1) & ~np.isnan(p)]
        out[int(cat_id)] = float(p.mean()) if p.size else None
    return out


def cocoeval_class():
    """The COCOeval used: faster-coco-eval's COCOeval_faster when importable and not overridden
    by MRCNN_COCOEVAL=pycocotools, else pycocotools' COCOeval (same interface and numbers)."""
    if os.environ.get("MRCNN_COCOEVAL", "").lower() != "pycocotools":
        try:
            from faster_coco_eval import COCOeval_faster
        except ImportError:
            pass
        else:
            return COCOeval_faster
    return COCOeval


def run_cocoeval(coco_gt, results: list[dict], iou_type: str, image_ids, *,
                 verbose: bool = False) -> COCOeval:
    """COCOeval (cocoeval_class) of non-empty `results` on `image_ids`, evaluated, accumulated
    and summarized (its printing silenced unless verbose)."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with contextlib.nullcontext() if verbose else quiet:
        coco_dt = coco_gt.loadRes(_results_for(results, iou_type))
        cls = cocoeval_class()
        # faster-coco-eval logs its summary unless told to print it.
        options = {"print_function": print} if verbose and cls is not COCOeval else {}
        coco_eval = cls(coco_gt, coco_dt, iou_type, **options)
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def coco_evaluate(coco_gt, results: list[dict], iou_types=("bbox", "segm"), image_ids=None,
                  *, verbose: bool = False) -> dict:
    """COCO metrics of `results` against `coco_gt` (a pycocotools COCO).

    results: COCO result dicts (see detections_to_coco_results); image_ids: the images evaluated
    (None = all of coco_gt's); images without any result count as having no detections.
    Returns {"AP": .., ..., "ARl": .., "mask_AP": .., ..., "per_class": {name: {"AP", "mask_AP"}}}
    with one group of twelve per iou type. Summary values follow pycocotools: -1.0 where no ground
    truth falls in that area range; per-class values are None where a class has no ground truth.
    An empty results list gives 0.0 everywhere (pycocotools cannot load an empty result set).
    verbose prints pycocotools' own summary; otherwise its output is swallowed.
    """
    return _coco_evaluate(coco_gt, results, iou_types, image_ids, verbose=verbose)[0]


def _coco_evaluate(coco_gt, results: list[dict], iou_types, image_ids, *, verbose: bool,
                   keep: bool = False) -> tuple[dict, dict[str, COCOeval]]:
    """coco_evaluate's metrics and, when `keep`, the COCOeval of each iou type (none where
    nothing was evaluated: no results or no images). Without `keep` each COCOeval (its per-image
    tables are large on a large set) is dropped before the next one is made."""
    for iou_type in iou_types:
        if iou_type not in IOU_TYPE_PREFIX:
            raise ValueError(f"unknown iou type {iou_type!r}; valid: {sorted(IOU_TYPE_PREFIX)}")
    known = set(coco_gt.getImgIds())
    image_ids = sorted(known) if image_ids is None else sorted({int(i) for i in image_ids})
    unknown = sorted({int(r["image_id"]) for r in results} - known)
    if unknown:
        raise ValueError(f"results name image ids absent from the ground truth: {unknown[:5]}")
    cats = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    per_class = {c["name"]: {} for c in cats}
    metrics: dict = {}
    evals: dict[str, COCOeval] = {}
    for iou_type in iou_types:
        prefix = IOU_TYPE_PREFIX[iou_type]
        if not results or not image_ids:
            stats = [0.0] * len(METRIC_NAMES)
            class_ap = {c["id"]: 0.0 if _category_has_gt(coco_gt, c["id"], image_ids) else None
                        for c in cats}
        else:
            coco_eval = run_cocoeval(coco_gt, results, iou_type, image_ids, verbose=verbose)
            if keep:
                evals[iou_type] = coco_eval
            stats = [float(v) for v in coco_eval.stats[:len(METRIC_NAMES)]]
            class_ap = _per_class_ap(coco_eval)
            del coco_eval
        for name, value in zip(METRIC_NAMES, stats, strict=True):
            metrics[prefix + name] = value
        for c in cats:
            per_class[c["name"]][prefix + "AP"] = class_ap[c["id"]]
    metrics["per_class"] = per_class
    return metrics, evals


def _find_coco_dataset(dataset):
    """The dataset holding `.coco` and `.category_ids`, looking through Subset-like wrappers."""
    seen = dataset
    while seen is not None:
        if hasattr(seen, "coco") and hasattr(seen, "category_ids"):
            return seen
        seen = getattr(seen, "dataset", None)
    raise DataError(f"evaluation needs a dataset with COCO ground truth (`.coco` and "
                    f"`.category_ids`, like CocoInstanceDataset); got {type(dataset).__name__}")


def predict_coco_results(model, spec, *, device=None, max_images=None, progress: bool = True,
                         dataset=None) -> tuple[list[dict], list[int], object, float]:
    """Run `model` over the spec's validation split and return its detections as COCO results.

    model: a Predictor, a PyTorch MaskRCNN or an exported backend (wrapped in a Predictor with
    the spec's use_amp). Iterates build_eval_loader(spec) (or `dataset`, batched by
    spec.eval_batch_size), maps detections back to original pixels, pastes masks at original
    resolution and encodes them as RLE. Returns (results, evaluated image ids, the dataset holding
    the COCO ground truth, seconds spent). device: None = where the model's parameters are;
    otherwise a PyTorch model is moved there. A model in training mode goes back to it after.
    """
    if dataset is None:
        loader = build_eval_loader(spec, max_images=max_images)
    else:
        loader = DataLoader(dataset, batch_size=spec.eval_batch_size, shuffle=False,
                            num_workers=0, collate_fn=collate_batch)
    gt_dataset = _find_coco_dataset(loader.dataset)
    predictor = as_predictor(model, spec, device=device, category_ids=gt_dataset.category_ids)
    include_mask = bool(spec.maskrcnn_config.include_mask)
    total = len(loader.dataset) if max_images is None else min(len(loader.dataset), max_images)

    results, image_ids = [], []
    on_gpu = predictor.device.type == "cuda"
    start = time.perf_counter()
    # RLE encoding (CPU) of one batch overlaps the next batch's forward (GPU): a worker thread
    # encodes while this thread waits on the device. On a GPU the masks stay there and only
    # their run boundaries come back (coco_results.mask_runs). At most PENDING_BATCHES batches of pasted
    # masks wait for it, so host memory stays bounded when encoding is the slower side.
    pending: collections.deque = collections.deque()

    def collect(limit: int) -> None:
        while len(pending) > limit:
            for future in pending.popleft():
                results.extend(future.result())

    with tqdm(total=total, desc="evaluate", unit="img", disable=not progress,
              file=sys.stdout) as bar, ThreadPoolExecutor(1, "mrcnn-rle") as encoder:
        for batch in loader:
            remaining = total - len(image_ids)
            if remaining <= 0:
                break
            images = batch["image"][:remaining]
            dets = predictor.forward(images)
            futures = []
            for i in range(images.shape[0]):
                image_id = int(batch["image_id"][i])
                # CPU copies: the next forward may overwrite the model's (graph) outputs.
                out = postprocess_detections(dets, i, float(batch["scale"][i]),
                                             tuple(batch["orig_size"][i]),
                                             score_threshold=0.0, include_mask=include_mask,
                                             masks_on_device=on_gpu)
                masks = out["masks"]
                if masks is not None and masks.is_cuda:
                    masks = mask_runs(masks)  # only the run boundaries leave the GPU
                futures.append(encoder.submit(
                    detections_to_coco_results, image_id, out["boxes"], out["scores"],
                    out["classes"], masks, gt_dataset.category_ids))
                image_ids.append(image_id)
            pending.append(futures)
            collect(PENDING_BATCHES)
            bar.update(images.shape[0])
        collect(0)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    elapsed = time.perf_counter() - start
    return results, image_ids, gt_dataset, elapsed


@dataclass
class Evaluation:
    """What run_evaluation measured, and what it was measured on.

    metrics: evaluate_model's dict. results: the COCO result dicts (original-image pixels).
    image_ids: the images evaluated, in loader order. dataset: the dataset holding the ground
    truth (`.coco`, `.category_ids`, and for image folders `.image_dir`). coco_evals: the
    evaluated, accumulated COCOeval of each iou type ("bbox", "segm"); empty when there were no
    detections (pycocotools cannot load an empty result set).
    """

    metrics: dict
    results: list[dict]
    image_ids: list[int]
    dataset: object
    coco_evals: dict[str, COCOeval] = field(default_factory=dict)


def run_evaluation(model, spec, *, device=None, max_images=None, progress: bool = True,
                   dataset=None, verbose: bool = False, keep_cocoeval: bool = True) -> Evaluation:
    """evaluate_model (same arguments), keeping the detections and, unless keep_cocoeval is
    False, pycocotools' COCOeval objects."""
    results, image_ids, gt_dataset, elapsed = predict_coco_results(
        model, spec, device=device, max_images=max_images, progress=progress, dataset=dataset)
    iou_types = ("bbox", "segm") if spec.maskrcnn_config.include_mask else ("bbox",)
    metrics, evals = _coco_evaluate(gt_dataset.coco, results, iou_types, image_ids,
                                    verbose=verbose, keep=keep_cocoeval)
    metrics["eval_images"] = len(image_ids)
    metrics["eval_images_per_sec"] = len(image_ids) / elapsed if elapsed > 0 else 0.0
    return Evaluation(metrics, results, image_ids, gt_dataset, evals)


def evaluate_model(model, spec, *, device=None, max_images=None, progress: bool = True,
                   dataset=None, verbose: bool = False) -> dict:
    """COCO box (and mask) metrics of `model` on the spec's validation split.

    The detections of predict_coco_results (same arguments) scored with coco_evaluate on the
    evaluated image ids only. Returns coco_evaluate's dict plus "eval_images" and
    "eval_images_per_sec" (the inference loop: loading, forward, pasting and RLE encoding;
    COCOeval excluded). run_evaluation also keeps the detections and COCOeval objects.
    """
    return run_evaluation(model, spec, device=device, max_images=max_images, progress=progress,
                          dataset=dataset, verbose=verbose, keep_cocoeval=False).metrics


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.9f}"


def format_metrics(metrics: dict) -> str:
    """TLT's metrics block: header, then `name: value` per line, COCO names sorted as TLT prints
    them (AP, AP50, AP75, APl, ...), then any other scalar entries (e.g. eval_images_per_sec)."""
    coco_names = {prefix + n for prefix in IOU_TYPE_PREFIX.values() for n in METRIC_NAMES}
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    ordered = sorted(k for k in scalars if k in coco_names)
    ordered += sorted(k for k in scalars if k not in coco_names)
    lines = [METRICS_HEADER] + [f"{k}: {_format_value(scalars[k])}" for k in ordered]
    return "\n".join(lines)


def format_per_class_table(metrics: dict) -> str:
    """Aligned table of metrics["per_class"]: class, AP, mask_AP (4 decimals; '-' = no GT)."""
    per_class = metrics.get("per_class", {})
    columns = ["AP", "mask_AP"]
    rows = [[name] + [("-" if values.get(c) is None else f"{values[c]:.4f}") for c in columns]
            for name, values in per_class.items()]
    header = ["class"] + columns
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first] + rest)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def write_metrics_json(metrics: dict, path) -> Path:
    """Write metrics as JSON atomically (fileio.atomic_write_json: NaN/inf as null); returns the
    path. Raises MrcnnError naming the path when it cannot be written (disk full, read-only): no
    file is then left half-written."""
    return atomic_write_json(path, metrics, what="metrics")


SUMMARY_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax100")


def format_summary(metrics: dict) -> str:
    """The metrics as a short table: a row for boxes and one for masks (when evaluated), the
    columns SUMMARY_COLUMNS at 3 decimals, "n/a" where COCOeval has no value (-1: no ground
    truth of that size), then the images evaluated and their rate."""
    rows = [(label, prefix) for label, prefix in (("box", ""), ("mask", "mask_"))
            if prefix + "AP" in metrics]

    def cell(value) -> str:
        return "n/a" if value is None or value < 0 or math.isnan(value) else f"{value:.3f}"

    lines = ["      " + " ".join(f"{c:>8}" for c in SUMMARY_COLUMNS)]
    for label, prefix in rows:
        lines.append(f"{label:<6}" + " ".join(f"{cell(metrics.get(prefix + c)):>8}"
                                              for c in SUMMARY_COLUMNS))
    if "eval_images" in metrics:
        rate = metrics.get("eval_images_per_sec")
        lines.append(f"{int(metrics['eval_images'])} images"
                     + (f", {rate:.1f} img/s" if rate else ""))
    return "\n".join(lines)
