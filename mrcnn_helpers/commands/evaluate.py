"""`mrcnn evaluate -e SPEC -m MODEL`: COCO metrics of any model file on the validation set, and
the evaluation's files in a folder (--save-dir; see mrcnn_helpers.evaluate.artifacts)."""

from __future__ import annotations

from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.evaluate import (
    format_per_class_table,
    format_summary,
    run_evaluation,
    write_metrics_json,
)
from mrcnn_helpers.evaluate.artifacts import write_evaluation_artifacts
from mrcnn_helpers.fileio import check_writable_dir

from .common import load_for_inference, memory_errors_named

DEFAULT_SAVE_DIR = "eval"


def default_save_dir(model: str) -> Path:
    """Where the files go without --save-dir: eval/ in the results directory given as -m, or in
    the folder of the model file (a results directory for its checkpoints)."""
    path = Path(model)
    return (path if path.is_dir() else path.parent) / DEFAULT_SAVE_DIR


def run(args) -> int:
    with memory_errors_named("evaluate"):
        return _run(args)


def _run(args) -> int:
    explicit = args.save_dir is not None
    save_dir = args.save_dir if explicit else str(default_save_dir(args.model))
    option = "--save-dir" if explicit else "the default --save-dir"
    # Checks --json and the folder against every input before the model is read.
    predictor = load_for_inference(args, outputs={option: save_dir})
    save_dir = _writable(save_dir, explicit)
    evaluation = run_evaluation(predictor, predictor.spec, max_images=args.max_images)
    metrics = evaluation.metrics
    print(format_summary(metrics))
    print(format_per_class_table(metrics))
    if args.json:
        write_metrics_json(metrics, args.json)
        print(f"metrics written to {args.json}")
    if save_dir is not None:
        write_evaluation_artifacts(evaluation, save_dir, score_threshold=args.threshold)
        print(f"evaluation files written to {save_dir}")
    return 0


def _writable(save_dir: str, explicit: bool) -> Path | None:
    """The folder, created; a default one that cannot be written is skipped with a note."""
    try:
        return check_writable_dir(save_dir, option="--save-dir")
    except MrcnnError as exc:
        if explicit:
            raise
        print(f"note: evaluation files not written ({exc}); name a folder with --save-dir")
        return None
