"""`mrcnn infer -i IMAGES -o OUT -m MODEL`: annotated images and COCO results."""

import json
from pathlib import Path

from mrcnn_helpers.inference.annotate import annotate_images

from .common import load_for_inference, read_labels


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
    predictor = load_for_inference(args)
    if args.labels:
        predictor.class_names = read_labels(args.labels, len(predictor.class_names))
    summary = annotate_images(predictor, args.input, args.output, threshold=args.threshold,
                              include_mask=args.include_mask, json_path=args.json,
                              ann_file=_annotation_file(args, predictor.spec))
    print(json.dumps(summary))
    return 0
