"""`mrcnn` command line: thin wrappers over the same functions the notebooks call.

    mrcnn spec validate|show SPEC
    mrcnn data synthetic|download-coco|convert-*|coco-subset|coco-merge|check|to-tfrecord ...
    mrcnn train    -e SPEC -r RESULTS_DIR              (re-run to resume)
    mrcnn evaluate -e SPEC -m MODEL
    mrcnn infer    -i IMAGES -o OUT -m MODEL -t 0.5 [--include-mask] [--json RESULTS.json]
    mrcnn export   -m MODEL -e SPEC -o model.onnx [--engine model.plan --data-type int8 ...]
    mrcnn deploy   -m MODEL|model.onnx|model.plan -i VIDEO|DIR|RTSP -o OUT.mp4

MODEL is a checkpoint, a results directory (its latest checkpoint), an .onnx or a TensorRT engine.

Bad input (spec, data, checkpoint) ends with one line naming the problem and exit status 2.
"""

import argparse
import json
import os
import sys
import warnings

from .errors import MrcnnError


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_spec(args) -> int:
    from .spec import format_spec, load_spec

    spec = load_spec(args.spec)
    if args.action == "show":
        print(format_spec(spec), end="")
    else:
        print(f"{args.spec}: valid")
    return 0


def cmd_train(args) -> int:
    from .engine import train
    from .evaluate import evaluate_model, format_metrics
    from .spec import load_spec

    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        from .engine.distributed import launch_processes

        load_spec(args.experiment_spec)  # fail here, once, on a bad spec
        argv = sys.argv[1:] if args.argv is None else args.argv
        return launch_processes(args.gpus, _without_option(argv, "--gpus"))
    spec = load_spec(args.experiment_spec)
    result = train(spec, args.results_dir, device=_device(args.device), max_steps=args.max_steps,
                   sync_bn=args.sync_bn, evaluate_fn=evaluate_model)
    if result.get("metrics"):
        print(format_metrics(result["metrics"]))
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the launcher passes the rest to each rank)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _load(args):
    """The model behind -m: a checkpoint, a results directory, an .onnx or a TensorRT engine."""
    from .export.backends import load_inference_model
    from .spec import load_spec

    spec = load_spec(args.experiment_spec) if getattr(args, "experiment_spec", None) else None
    device = _device(args.device)
    model, spec, class_names, category_ids = load_inference_model(
        args.model, spec=spec, device=device, key=args.key)
    return model, spec, class_names, category_ids, device


def cmd_evaluate(args) -> int:
    from .evaluate import (evaluate_model, format_metrics, format_per_class_table,
                           write_metrics_json)

    model, spec, _, _, device = _load(args)
    metrics = evaluate_model(model, spec, device=device, max_images=args.max_images)
    print(format_metrics(metrics))
    print(format_per_class_table(metrics))
    if args.json:
        write_metrics_json(metrics, args.json)
        print(f"metrics written to {args.json}")
    return 0


def _read_labels(path: str) -> list[str]:
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise MrcnnError(f"cannot read labels file {path}: {exc.strerror}") from None
    return names


def cmd_infer(args) -> int:
    from .predict import run_inference

    model, spec, class_names, category_ids, device = _load(args)
    if args.labels:
        names = _read_labels(args.labels)
        if len(names) == len(class_names) - 1:
            names = ["background"] + names
        if len(names) != len(class_names):
            raise MrcnnError(f"{args.labels}: {len(names)} labels, but the model has "
                             f"{len(class_names) - 1} classes (one label per line, no background)")
        class_names = names
    summary = run_inference(model, spec, class_names, category_ids, args.input, args.output,
                            threshold=args.threshold, include_mask=args.include_mask,
                            json_path=args.json, device=device)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrcnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="validate or show a spec file")
    p.add_argument("action", choices=["validate", "show"])
    p.add_argument("spec")
    p.set_defaults(func=cmd_spec)

    from .data.commands import add_data_commands

    add_data_commands(sub)

    def common(p, spec_required):
        p.add_argument("-e", "--experiment-spec", required=spec_required,
                       help="spec file" + ("" if spec_required else " (default: the checkpoint's)"))
        p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")

    p = sub.add_parser("train", help="train; re-running resumes from the last checkpoint")
    common(p, True)
    p.add_argument("-r", "--results-dir", required=True)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (the schedule still follows total_steps)")
    p.add_argument("--gpus", type=int, default=1,
                   help="data-parallel processes on this node, one per GPU (torchrun underneath; "
                        "with --device cpu, CPU processes on gloo)")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --gpus > 1 on CUDA: BatchNorm statistics over the global batch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO box and mask metrics on the validation set")
    common(p, False)
    p.add_argument("-m", "--model", required=True,
                   help="checkpoint, results directory, exported .onnx or TensorRT .plan")
    p.add_argument("-k", "--key", default=None, help="key of an encrypted model file")
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.add_argument("--max-images", type=int, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("infer", help="annotate images and write COCO results")
    common(p, False)
    p.add_argument("-m", "--model", required=True,
                   help="checkpoint, results directory, exported .onnx or TensorRT .plan")
    p.add_argument("-k", "--key", default=None, help="key of an encrypted model file")
    p.add_argument("-i", "--input", required=True, help="directory of images")
    p.add_argument("-o", "--output", required=True, help="directory for annotated images")
    p.add_argument("-t", "--threshold", type=float, default=0.5)
    p.add_argument("--include-mask", action="store_true")
    p.add_argument("--json", default=None, help="COCO results JSON (RLE masks)")
    p.add_argument("-l", "--labels", default=None, help="class names file, one per line")
    p.set_defaults(func=cmd_infer)

    from .export.commands import add_export_commands

    add_export_commands(sub)
    return parser


def _one_line(exc: Exception) -> str:
    """The message of an error, without the worker traceback that DataLoader wraps around it."""
    text = str(exc)
    if "Original Traceback" in text:  # raised in a DataLoader worker and re-raised here
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if "Error: " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except MrcnnError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
