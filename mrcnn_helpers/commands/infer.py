"""`mrcnn infer -i IMAGES -o OUT -m MODEL`: annotated images and COCO results."""

import json
from pathlib import Path

from mrcnn_helpers.inference.annotate import annotate_images, check_annotation_outputs
from mrcnn_helpers.spec import load_spec

from .common import (
    command_inputs,
    load_for_inference,
    memory_errors_named,
    read_labels,
    spec_inputs,
)


def _annotation_file(args, spec) -> str | None:
    """--ann, or the spec's val_json_file when the input folder is its val_image_dir."""
    if args.ann:
        return args.ann
    data = getattr(spec, "data_config", None)
    val_dir, val_json = getattr(data, "val_image_dir", ""), getattr(data, "val_json_file", "")
    if val_dir and val_json and Path(val_dir).resolve() == Path(args.input).resolve():
        return val_json
    return None


def run(args) -> int:
    with memory_errors_named("infer"):
        return _run(args)


def _run(args) -> int:
    # Outputs are checked before the model is read, and again (with the files its spec names)
    # by annotate_images.
    spec = load_spec(args.experiment_spec) if args.experiment_spec else None
    check_annotation_outputs(args.input, args.output, json_path=args.json, ann_file=args.ann,
                             inputs=command_inputs(args, spec=spec))
    predictor = load_for_inference(args)
    if args.labels:
        predictor.class_names = read_labels(args.labels, len(predictor.class_names))
    inputs = command_inputs(args) + [predictor.source] + spec_inputs(predictor.spec)
    summary = annotate_images(predictor, args.input, args.output, threshold=args.threshold,
                              include_mask=args.include_mask, json_path=args.json,
                              ann_file=_annotation_file(args, predictor.spec), inputs=inputs)
    print(json.dumps(summary))
    return 0
