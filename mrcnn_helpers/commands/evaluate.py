"""`mrcnn evaluate -e SPEC -m MODEL`: COCO metrics of any model file on the validation set."""

from mrcnn_helpers.evaluate import (
    evaluate_model,
    format_metrics,
    format_per_class_table,
    write_metrics_json,
)
from mrcnn_helpers.fileio import check_output_path

from .common import load_for_inference


def run(args) -> int:
    if args.json:
        check_output_path(args.json, [args.model, args.experiment_spec], option="--json")
    predictor = load_for_inference(args)
    metrics = evaluate_model(predictor, predictor.spec, max_images=args.max_images)
    print(format_metrics(metrics))
    print(format_per_class_table(metrics))
    if args.json:
        write_metrics_json(metrics, args.json)
        print(f"metrics written to {args.json}")
    return 0
