"""The figures of `mrcnn evaluate --save-dir`: precision/recall curves, the confusion matrix and
predictions next to their ground truth.

Each function returns a `matplotlib.figure.Figure` (plotting.new_figure: object API, no pyplot,
FIGURE_DPI, text at FONT_SIZE or more); lines and drawings use the class colors of
visualize.PALETTE. matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

import numpy as np

from mrcnn_helpers.plotting import FONT_SIZE, new_figure, style_axes
from mrcnn_helpers.visualize import class_color

MAX_LEGEND_CLASSES = 20  # more classes: one curve each, only the mean in the legend
MAX_ANNOTATED_CELLS = 26  # confusion matrices up to this size carry their counts as text


def _rgb(label: int) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in class_color(label))


def pr_curves_figure(curves: dict, class_names: list[str], labels: list[int] | None = None,
                     what: str = "mask"):
    """Two panels of analysis.pr_curves: precision over recall at IoU 0.50 and averaged over
    IoU 0.50:0.95, one line per class with ground truth (its AP in the legend) and their mean
    (all classes, its AP = the mAP) in black. class_names[k] / labels[k]: the name and the
    contiguous label (its color; default k + 1) of curves' category k."""
    labels = list(range(1, len(class_names) + 1)) if labels is None else labels
    recall = curves["recall"]
    fig = new_figure((13.0, 5.0))
    axes = fig.subplots(1, 2)
    panels = (("precision50", "ap50", "IoU 0.50"), ("precision", "ap", "IoU 0.50:0.95"))
    for ax, (key, ap_key, iou) in zip(axes, panels, strict=True):
        present = [k for k, ap in enumerate(curves[ap_key]) if ap is not None]
        labelled = len(present) <= MAX_LEGEND_CLASSES
        for k in present:
            ax.plot(recall, curves[key][k], color=_rgb(labels[k]), linewidth=1.4,
                    label=f"{class_names[k]} {curves[ap_key][k]:.3f}" if labelled else None)
        if present:
            mean = np.mean(np.asarray(curves[key])[present], axis=0)
            mean_ap = float(np.mean([curves[ap_key][k] for k in present]))
            ax.plot(recall, mean, color="black", linewidth=3.0,
                    label=f"all classes {mean_ap:.3f}")
            ax.legend(fontsize=FONT_SIZE, title="AP", title_fontsize=FONT_SIZE,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no detections, or no ground truth", ha="center", va="center",
                    fontsize=FONT_SIZE, transform=ax.transAxes)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        style_axes(ax, "recall", "precision", f"{what} precision / recall, {iou}")
    return fig


def confusion_matrix_figure(counts: np.ndarray, class_names: list[str], subtitle: str = ""):
    """The counts of analysis.confusion_matrix as a heat map, rows the ground truth and columns
    the prediction (the last of each: background), each cell's count written in it while the
    matrix has at most MAX_ANNOTATED_CELLS rows. class_names: the K classes (no background)."""
    counts = np.asarray(counts)
    names = list(class_names) + ["background"]
    n = len(names)
    side = float(np.clip(0.55 * n + 3.0, 6.0, 22.0))
    fig = new_figure((side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.ax.tick_params(labelsize=FONT_SIZE)
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), names)
    if n <= MAX_ANNOTATED_CELLS:
        high = counts.max() / 2.0
        for (row, col), value in np.ndenumerate(counts):
            if value:
                ax.text(col, row, str(int(value)), ha="center", va="center", fontsize=FONT_SIZE,
                        color="white" if value > high else "black")
    title = "confusion matrix" + (f" ({subtitle})" if subtitle else "")
    style_axes(ax, "predicted", "ground truth", title)
    return fig


def predictions_figure(panels: list[tuple[str, object, str, object]]):
    """A grid of rows (prediction title, prediction image, ground-truth title, ground-truth
    image): the prediction on the left, the ground truth on the right (PIL images or uint8
    arrays)."""
    rows = max(len(panels), 1)
    first = np.asarray(panels[0][1]) if panels else np.zeros((1, 1, 3))
    aspect = first.shape[0] / max(first.shape[1], 1)
    width = 12.0
    fig = new_figure((width, rows * (width / 2 * aspect + 0.4)))
    axes = np.asarray(fig.subplots(rows, 2)).reshape(rows, 2)
    for ax in axes.reshape(-1):
        ax.set_axis_off()
        ax.set_xticks([])
        ax.set_yticks([])
    for (left, right), (pred_title, pred, gt_title, gt) in zip(axes, panels, strict=False):
        for ax, title, image in ((left, pred_title, pred), (right, gt_title, gt)):
            ax.imshow(np.asarray(image))
            ax.set_title(title, fontsize=FONT_SIZE)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no images evaluated", ha="center", va="center",
                        fontsize=FONT_SIZE, transform=axes[0, 0].transAxes)
    return fig
