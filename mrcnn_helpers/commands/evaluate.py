"""`mrcnn evaluate -e SPEC -m MODEL`: COCO metrics of any model file on the validation set."""

from mrcnn_helpers.evaluate import (
    evaluate_model,
    format_per_class_table,
    format_summary,
    write_metrics_json,
)

from .common import load_for_inference, memory_errors_named


def run(args) -> int:
    with memory_errors_named("evaluate"):
        return _run(args)


def _run(args) -> int:
    predictor = load_for_inference(args)  # checks --json against every input first
    metrics = evaluate_model(predictor, predictor.spec, max_images=args.max_images)
    print(format_summary(metrics))
    print(format_per_class_table(metrics))
    if args.json:
        write_metrics_json(metrics, args.json)
        print(f"metrics written to {args.json}")
    return 0
