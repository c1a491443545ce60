"""Helpers the notebooks call: tables, figures, a live training plot and an image viewer.

    from mrcnn_helpers import notebook as nb
    nb.use_repo_root("..")                 # spec paths are relative to the repository root
    nb.spec_table(spec)                    # every spec field, changes in bold
    monitor = nb.TrainingMonitor(results_dir)
    train(spec, results_dir, on_log=monitor)
    result = nb.evaluate_detailed(model, spec)
    nb.metrics_table(result.metrics); nb.plot_per_class_ap(result.metrics); nb.plot_pr_curves(result)
    nb.InstanceViewer(predictor, val_json, val_images)
    nb.onnx_io_table("model.onnx"); nb.parity_table(model, onnx_model, images)
    nb.ap_table(compare_ap(models, spec)); nb.deploy_stats_table({"onnx": stats})

Figures are matplotlib Figures (no pyplot), tables render as HTML in Jupyter and as text
elsewhere. Needs the `notebooks` extra (matplotlib, ipywidgets; IPython comes with ipykernel).
"""

from __future__ import annotations

import os
from pathlib import Path

from mrcnn_helpers.engine.checkpoint import latest_checkpoint
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.inference.loading import LoadedModel, load_model_file

from .analysis import EvalResult, evaluate_detailed, masks_to_rles, match_instances
from .deployment import (
    accuracy_table,
    ap_table,
    deploy_stats_table,
    onnx_io_table,
    opencv_available,
    parity_table,
    plot_per_class_precision,
    show_calibration_image,
    show_frames,
    tensorrt_choice,
    write_video,
)
from .monitor import TrainingMonitor
from .plots import (
    FIGURE_DPI,
    draw_ground_truth,
    figure_png,
    image_grid,
    load_ground_truth,
    plot_dataset_stats,
    plot_per_class_ap,
    plot_pr_curves,
    show_ground_truth,
    show_predictions,
)
from .tables import Table, dataset_summary, metrics_table, spec_changes, spec_table
from .viewer import InstanceViewer

__all__ = [
    "FIGURE_DPI",
    "EvalResult",
    "InstanceViewer",
    "Table",
    "TrainingMonitor",
    "accuracy_table",
    "ap_table",
    "dataset_summary",
    "deploy_stats_table",
    "draw_ground_truth",
    "evaluate_detailed",
    "figure_png",
    "image_grid",
    "load_experiment",
    "load_ground_truth",
    "masks_to_rles",
    "match_instances",
    "metrics_table",
    "onnx_io_table",
    "opencv_available",
    "parity_table",
    "plot_dataset_stats",
    "plot_per_class_ap",
    "plot_per_class_precision",
    "plot_pr_curves",
    "show_calibration_image",
    "show_frames",
    "show_ground_truth",
    "show_predictions",
    "spec_changes",
    "spec_table",
    "tensorrt_choice",
    "use_repo_root",
    "write_video",
]

# The directory the kernel started in (the notebook's folder), remembered at the first call of
# use_repo_root so that re-running the cell does not climb one more level each time.
_start_dir: Path | None = None


def use_repo_root(root: str | os.PathLike = "..") -> Path:
    """Change the working directory to `root`, resolved against the directory the kernel started
    in (not the current one: calling it again is harmless). Spec files name their data paths
    relative to the repository root, as the CLI does. Returns the absolute root.
    Raises FileNotFoundError naming the resolved path when it is not a directory.
    """
    global _start_dir
    if _start_dir is None:
        _start_dir = Path.cwd()
    target = (_start_dir / root).resolve()
    if not target.is_dir():
        raise FileNotFoundError(f"root {root!r} resolves to {target}, which is not a directory; "
                                f"set `root` to the repository folder (the notebooks' parent)")
    os.chdir(target)
    return target


def load_experiment(results_dir: str | os.PathLike, device=None) -> LoadedModel:
    """The newest checkpoint of a training run, ready for inference.

    Returns a LoadedModel (model in eval mode, the spec stored in the checkpoint, class_names,
    category_ids; it unpacks as that 4-tuple, and `.predictor()` makes a Predictor). Raises
    CheckpointError when results_dir holds no checkpoint (naming the directory and how to make
    one).
    """
    path = latest_checkpoint(results_dir) if Path(results_dir).is_dir() else None
    if path is None:
        raise CheckpointError(f"no checkpoint (model.step-N.pth) in {results_dir}: train first "
                              f"(notebook 03_train or `mrcnn train -e SPEC -r {results_dir}`)")
    return load_model_file(path, device=device)


def _register_figure_formatter() -> None:
    """Let Jupyter show a returned matplotlib Figure as PNG (figure_png: at least FIGURE_DPI)
    without pyplot being imported (matplotlib's inline backend registers this only when pyplot
    is)."""
    try:
        from IPython import get_ipython
        from matplotlib.figure import Figure
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]
    formatter.for_type(Figure, figure_png)


_register_figure_formatter()
