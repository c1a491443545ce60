"""Figures for notebooks: ground truth and predictions drawn on images, dataset statistics,
per-class AP and precision/recall curves.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so nothing is shown
twice or kept alive by pyplot's figure registry; Jupyter shows a returned figure as PNG (the
formatter is registered when `mrcnn_helpers.notebook` is imported), and `fig.savefig(path)` writes
it to a file. Figures are made at FIGURE_DPI (inline PNGs and savefig alike), with legends, axis
labels, ticks and annotations at FONT_SIZE points or more and lines in the class colors of
visualize.PALETTE (all readable on white).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mrcnn_helpers.data.coco import load_coco
from mrcnn_helpers.data.images import load_image
from mrcnn_helpers.inference.predictor import to_image_tensor
from mrcnn_helpers.plotting import FIGURE_DPI, FONT_SIZE, new_figure, style_axes
from mrcnn_helpers.visualize import class_color, draw_instances

BLUE, ORANGE = "#4c72b0", "#b05000"  # two series that are not classes (contrast >= 4.5 on white)


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure at its dpi, and at least FIGURE_DPI (what Jupyter shows inline)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=max(float(fig.dpi), FIGURE_DPI), bbox_inches="tight",
                facecolor=fig.get_facecolor(), edgecolor=fig.get_edgecolor())
    return buffer.getvalue()


def series_color(k: int) -> tuple[float, float, float]:
    """The k-th (0-based) color of a series of lines that are not classes: the palette's."""
    return _color(k + 1)


def _color(label: int) -> tuple[float, float, float]:
    """The class's drawing color (visualize.PALETTE) as matplotlib RGB in 0..1."""
    return tuple(c / 255.0 for c in class_color(label))


def image_grid(images, titles=None, cols: int = 4, width: float | None = None) -> Figure:
    """A grid of images (PIL images or uint8 [h, w, 3] arrays) with optional titles, no axes.
    width: figure width in inches (default 3.5 per column, at most 14)."""
    images = list(images)
    n = max(len(images), 1)
    cols = max(1, min(cols, n))
    width = min(14.0, 3.5 * cols) if width is None else float(width)
    rows = math.ceil(n / cols)
    first = np.asarray(images[0]) if images else np.zeros((1, 1, 3))
    aspect = first.shape[0] / max(first.shape[1], 1)
    fig = new_figure((width, width / cols * aspect * rows + 0.45 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(np.asarray(images[i]))
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=FONT_SIZE)
    if not images:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=FONT_SIZE)
    return fig


def load_ground_truth(coco, image_id: int) -> dict:
    """One image's annotations as drawing inputs: boxes float [N, 4] (x1, y1, x2, y2) in original
    pixels, classes int [N] (contiguous labels, categories in sorted-id order), masks bool
    [N, h, w], crowd bool [N], in annotation order."""
    info = coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    label_of = {cid: i + 1 for i, cid in enumerate(sorted(coco.getCatIds()))}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32).reshape(-1, 4)
    classes = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
    masks = (np.stack([coco.annToMask(a).astype(bool) for a in anns]) if anns
             else np.zeros((0, h, w), dtype=bool))
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    return {"boxes": boxes, "classes": classes, "masks": masks, "crowd": crowd}


def draw_ground_truth(coco, image_dir, image_id: int, mask_alpha: float = 0.5):
    """PIL image of one COCO image with its annotations (masks, boxes, class names) drawn."""
    info = coco.imgs[image_id]
    image = load_image(str(Path(image_dir) / info["file_name"]), image_id)
    gt = load_ground_truth(coco, image_id)
    names = ["background"] + [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    return draw_instances(image, gt["boxes"], None, gt["classes"], names, masks=gt["masks"],
                          mask_alpha=mask_alpha)


def show_ground_truth(json_file, image_dir, num_images: int = 8, cols: int = 4,
                      image_ids=None) -> Figure:
    """A grid of dataset images with their ground-truth masks, boxes and class names.

    json_file: COCO instances JSON (or a loaded pycocotools COCO); image_ids: which images
    (default: the first num_images by id). Titles give the file name and instance count.
    """
    coco = load_coco(json_file) if not hasattr(json_file, "imgs") else json_file
    ids = sorted(coco.imgs)[:num_images] if image_ids is None else list(image_ids)
    drawn = [draw_ground_truth(coco, image_dir, i) for i in ids]
    titles = [f"{coco.imgs[i]['file_name']}: {len(coco.getAnnIds(imgIds=[i]))} instances"
              for i in ids]
    return image_grid(drawn, titles, cols=cols)


def show_predictions(predictor, images, score_threshold: float = 0.5, cols: int = 4) -> Figure:
    """Run `predictor` (mrcnn_helpers.inference.Predictor) on images (paths, PIL images or uint8
    tensors) and show each with its detections >= score_threshold drawn."""
    images = list(images)
    outputs = predictor.predict(images, score_threshold=score_threshold)
    drawn, titles = [], []
    for image, out in zip(images, outputs, strict=True):
        drawn.append(draw_instances(to_image_tensor(image), out["boxes"], out["scores"],
                                    out["classes"], predictor.class_names, masks=out["masks"]))
        name = Path(image).name if isinstance(image, (str, Path)) else f"image {len(titles)}"
        titles.append(f"{name}: {len(out['scores'])} detections >= {score_threshold:g}")
    return image_grid(drawn, titles, cols=cols)


def plot_dataset_stats(json_file) -> Figure:
    """Two panels: instances per image (histogram) and instance size sqrt(area) per class, with
    COCO's small / large boundaries (32 and 96 px) marked."""
    coco = load_coco(json_file) if not hasattr(json_file, "imgs") else json_file
    fig = new_figure((12, 3.8))
    ax_count, ax_size = fig.subplots(1, 2)
    counts = [len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in sorted(coco.imgs)]
    top = max(counts, default=0)
    ax_count.hist(counts, bins=np.arange(top + 2) - 0.5, color="0.4", rwidth=0.85)
    style_axes(ax_count, "instances per image", "images", f"{len(counts)} images")
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    sizes = [[math.sqrt(a["area"]) for a in coco.loadAnns(coco.getAnnIds(catIds=[c["id"]]))
              if not a.get("iscrowd", 0)] for c in cats]
    largest = max((max(s) for s in sizes if s), default=1.0)
    bins = np.linspace(0, largest * 1.05, 30)
    for label, (cat, values) in enumerate(zip(cats, sizes, strict=True), start=1):
        ax_size.hist(values, bins=bins, histtype="step", linewidth=2, color=_color(label),
                     label=f"{cat['name']} ({len(values)})")
    for edge, name in ((32, "small | medium"), (96, "medium | large")):
        if edge < bins[-1]:
            ax_size.axvline(edge, color="0.5", linestyle="--", linewidth=1)
            near_right = edge > 0.75 * bins[-1]  # keep the label inside the axes
            ax_size.text(edge, ax_size.get_ylim()[1] * 0.95, f" {name} ", fontsize=FONT_SIZE,
                         va="top",
                         ha="right" if near_right else "left")
    style_axes(ax_size, "instance size sqrt(area) [px]", "instances", "instance sizes per class")
    ax_size.legend(fontsize=FONT_SIZE)
    return fig


def plot_per_class_ap(metrics: dict) -> Figure:
    """Grouped bars of box AP and mask AP per class (metrics["per_class"], AP@[.5:.95]), values
    written on the bars; classes without ground truth are marked 'no GT'."""
    per_class = metrics.get("per_class", {})
    names = list(per_class)
    kinds = [k for k in ("AP", "mask_AP") if any(k in v for v in per_class.values())]
    fig = new_figure((max(6.0, 1.2 * len(names) + 2), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(names))
    for j, kind in enumerate(kinds):
        values = [per_class[n].get(kind) for n in names]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(x + (j - (len(kinds) - 1) / 2) * width, heights, width,
                      label="box AP" if kind == "AP" else "mask AP",
                      color=(BLUE, ORANGE)[j % 2])
        for bar, value in zip(bars, values, strict=True):
            text = "no GT" if value is None else f"{value:.3f}"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center",
                    va="bottom", fontsize=FONT_SIZE)
    ax.set_xticks(x, names, rotation=30 if len(names) > 8 else 0)
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    style_axes(ax, ylabel="AP @ IoU .50:.95", title="Per-class AP")
    ax.legend(fontsize=FONT_SIZE)
    return fig


def plot_pr_curves(result, iou_thresholds=(0.5, 0.75)) -> Figure:
    """Precision/recall curves per class from COCOeval's precision array, one panel per iou type
    (box, mask); solid lines at the first IoU threshold, dashed at the second.

    result: an analysis.EvalResult. Curves are COCO's interpolated precision at its 101 recall
    points (area "all", up to 100 detections); a class without ground truth is left out.
    """
    types = [t for t in ("bbox", "segm") if t in result.precision]
    fig = new_figure((6.5 * max(len(types), 1), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(types), 1)))
    if not types:
        axes[0].text(0.5, 0.5, "no detections: nothing to plot", ha="center", va="center",
                     fontsize=FONT_SIZE)
        axes[0].set_axis_off()
        return fig
    recall = np.asarray(result.recall_thresholds)
    styles = ("-", "--", ":", "-.")
    for ax, iou_type in zip(axes, types, strict=True):
        precision = result.precision[iou_type]
        for t_index, iou in enumerate(iou_thresholds):
            t = int(np.argmin(np.abs(np.asarray(result.iou_thresholds) - iou)))
            for k, name in enumerate(result.class_names):
                p = precision[t, :, k]
                if np.all(p < 0):
                    continue  # no ground truth for this class
                ap = float(p[p >= 0].mean())
                ax.plot(recall, np.clip(p, 0, None), styles[t_index % len(styles)],
                        color=_color(k + 1), linewidth=1.8,
                        label=f"{name} @{iou:g} (AP {ap:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        style_axes(ax, "recall", "precision",
                   ("box" if iou_type == "bbox" else "mask") + " precision / recall")
        ax.grid(alpha=0.3)
        # Outside the axes: curves of a good model fill the corners a legend would cover.
        ax.legend(fontsize=FONT_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
