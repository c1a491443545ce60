"""`mrcnn` command line: the arguments of every command; the work is done in mrcnn_helpers.commands.

    mrcnn spec validate|show SPEC
    mrcnn data synthetic|download-coco|convert-*|coco-subset|coco-merge|check|to-tfrecord ...
    mrcnn train    -e SPEC -r RESULTS_DIR [--gpus N]     (re-run to resume)
    mrcnn evaluate -e SPEC -m MODEL [--save-dir DIR]  (metrics.json, PR curves, confusion matrix)
    mrcnn infer    -i IMAGES -o OUT -m MODEL -t 0.5 [--include-mask] [--json RESULTS.json]
    mrcnn export   -m MODEL -o model.onnx [--data-type fp32|fp16|int8 ...] [--engine model.plan]
    mrcnn deploy   -m MODEL -i VIDEO|DIR|RTSP -o OUT.avi|OUT.mp4|DIR

MODEL is a checkpoint, a results directory (its latest checkpoint), a weights file, an .onnx or a
TensorRT engine. TLT's command lines run unchanged with `mrcnn` in place of `tlt-train mask_rcnn`
(and evaluate / infer / export): every long option also takes TLT's underscore spelling
(--include_mask, --data_type, --cal_image_dir, ...), and -k KEY is accepted everywhere.

This module imports nothing heavy: `mrcnn --help` answers at once, and each command's module
(mrcnn_helpers.commands.<name>) is imported only when that command runs.
Bad input (spec, data, checkpoint) ends with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from mrcnn_helpers.data.commands import add_data_commands
from mrcnn_helpers.errors import MrcnnError

PROG = "mrcnn"
DATA_TYPES = ("fp32", "fp16", "int8")  # export --data-type (TLT's names)
CAL_METHODS = ("entropy", "percentile", "max")  # INT8 calibration methods
PRECISIONS = ("fp32", "fp16", "bf16")  # autocast of PyTorch models on a GPU


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring layout, shows defaults, and lists each option once (its dash form;
    the underscore spelling TLT uses is accepted but not repeated in the help)."""

    def _format_action_invocation(self, action):
        if action.option_strings:
            dashed = [s for s in action.option_strings
                      if not (s.startswith("--") and "_" in s
                              and "--" + s[2:].replace("_", "-") in action.option_strings)]
            action = argparse.Action(dashed, action.dest, nargs=action.nargs,
                                     metavar=action.metavar, choices=action.choices)
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose long options with dashes also answer to TLT's underscore form."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        extra = [_underscored(n) for n in names
                 if n.startswith("--") and "-" in n[2:] and _underscored(n) not in names]
        return super().add_argument(*names, *extra, **kwargs)


def _underscored(option: str) -> str:
    """TLT's spelling of a long option: --include-mask -> --include_mask."""
    return "--" + option[2:].replace("-", "_")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a score between 0 and 1, got {text}")
    return value


def _handler(name: str) -> dict:
    return {"handler": f"mrcnn_helpers.commands.{name}:run"}


def _common(p, *, spec_required: bool, model: bool = True) -> None:
    p.add_argument("-e", "--experiment-spec", required=spec_required, default=None,
                   help="spec file" + ("" if spec_required else " (default: the model's own)"))
    if model:
        p.add_argument("-m", "--model", required=True,
                       help="checkpoint, results directory, weights file, .onnx or TensorRT .plan")
    p.add_argument("-k", "--key", default=None,
                   help="passphrase of encrypted model files (TLT's model key)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1 or cpu (default: cuda when a GPU is visible)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train; re-running the same command resumes")
    _common(p, spec_required=True, model=False)
    p.add_argument("-r", "--results-dir", required=True, help="checkpoints, logs and metrics")
    p.add_argument("--max-steps", type=_positive, default=None,
                   help="stop after this global step (the schedule still follows total_steps)")
    p.add_argument("--gpus", type=_positive, default=1,
                   help="data-parallel processes on this node, one per GPU (torchrun underneath; "
                        "with --device cpu, CPU processes on gloo)")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --gpus > 1 on CUDA: BatchNorm statistics over the global batch")
    p.add_argument("--tlt-log", action="store_true",
                   help="print TLT's full metric block at every log (train.log always has it)")
    p.set_defaults(**_handler("train"))


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="COCO box and mask metrics on the validation set")
    _common(p, spec_required=False)
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.add_argument("--save-dir", default=None, metavar="DIR",
                   help="write metrics.json, pr_curves.png, confusion_matrix.png and "
                        "predictions.png here (default: eval/ in the results directory given "
                        "as -m, or beside the model file)")
    p.add_argument("-t", "--threshold", type=_probability, default=0.5,
                   help="score threshold of the confusion matrix and predictions.png")
    p.add_argument("--max-images", type=_positive, default=None,
                   help="evaluate the first N validation images only")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="images per forward pass (default: the spec's eval_batch_size)")
    p.set_defaults(**_handler("evaluate"))


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="annotate images and write COCO results")
    _common(p, spec_required=False)
    p.add_argument("-i", "--input", required=True, help="folder of images")
    p.add_argument("-o", "--output", required=True, help="folder for the annotated images")
    p.add_argument("-t", "--threshold", type=_probability, default=0.5,
                   help="keep detections scoring at least this")
    p.add_argument("--include-mask", action="store_true",
                   help="draw masks (and write them as RLE to --json)")
    p.add_argument("--json", default=None, help="COCO results JSON to write")
    p.add_argument("--ann", default=None,
                   help="COCO JSON listing the input images: --json then uses its image ids "
                        "(default: the spec's val_json_file when -i is its val_image_dir, else "
                        "each image's position in the sorted folder)")
    p.add_argument("-l", "--labels", default=None,
                   help="class names: a text file (one per line) or a JSON list / COCO file")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="images per forward pass (default: the spec's eval_batch_size)")
    p.set_defaults(**_handler("infer"))


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX (fp32, fp16 or int8 Q/DQ), verified against "
                                      "PyTorch; TensorRT engine and DeepStream config")
    _common(p, spec_required=False)
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--data-type", choices=DATA_TYPES, default="fp32",
                   help="precision of the exported graph: fp16 casts it, int8 calibrates and "
                        "inserts Q/DQ nodes")
    p.add_argument("--batch-size", type=_positive, default=1, help="fixed batch of the graph")
    p.add_argument("--layout", choices=("deepstream", "compact"), default="deepstream",
                   help="output tensors: DeepStream's Mask R-CNN layout or a compact one")
    p.add_argument("--normalize-in-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="graph takes 0..255 pixels; --no-normalize-in-graph leaves mean/scale to "
                        "DeepStream's offsets")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--cal-image-dir", default=None, help="INT8 calibration images")
    p.add_argument("--batches", type=_positive, default=10, help="INT8 calibration batches")
    p.add_argument("--cal-batch-size", type=_positive, default=None,
                   help="images per calibration batch (default: --batch-size)")
    p.add_argument("--cal-method", choices=CAL_METHODS, default="max",
                   help="INT8 calibration method (max: measured best here, docs/EXPORT.md)")
    p.add_argument("--cal-percentile", type=float, default=99.99,
                   help="with --cal-method percentile: the percentile of |activation| kept")
    p.add_argument("--cal-cache-file", default=None,
                   help="INT8 ranges (JSON): reused when computed for this graph and method, "
                        "written otherwise")
    p.add_argument("--int8-exclude", nargs="*", default=[], metavar="PATTERN",
                   help="node-name patterns kept in float in the INT8 graph (e.g. '*fpn*')")
    p.add_argument("--fp16-exclude", nargs="*", default=[], metavar="PATTERN",
                   help="node-name patterns kept in fp32 in the FP16 graph")
    p.add_argument("--cal-data-file", default=None,
                   help="accepted for TLT command lines; calibration reads --cal-image-dir")
    p.add_argument("--engine", default=None,
                   help="also build a TensorRT engine here (.plan; needs TensorRT 10 or 11)")
    p.add_argument("--workspace", type=_positive, default=4096, help="TensorRT workspace, MiB")
    p.add_argument("--deepstream", default=None, metavar="DIR",
                   help="write nvinfer + deepstream-app configs and labels here")
    p.add_argument("--gen-ds-config", action="store_true",
                   help="write the DeepStream configs beside the output (TAO's flag; same as "
                        "--deepstream DIR_OF_OUTPUT)")
    p.add_argument("--ds-custom-lib", default=None,
                   help="DeepStream parser library with NvDsInferParseCustomMrcnnTLTV2")
    p.add_argument("--ds-video", default=None,
                   help="URI of the deepstream-app config's source (default: DeepStream's sample)")
    p.add_argument("--verify-images", type=int, default=100,
                   help="validation images for the parity check and the accuracy table of "
                        "every precision (0 = skip)")
    p.add_argument("--ap-tolerance", type=float, default=0.01,
                   help="warn when a reduced precision loses more mask AP than this (0.01 = "
                        "1 point)")
    p.set_defaults(**_handler("export"))


def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="annotate a video, stream or image folder; prints FPS and "
                                      "latency")
    _common(p, spec_required=False)
    p.add_argument("-i", "--input", required=True,
                   help="video file, image folder, rtsp:// URL or webcam[:N]")
    p.add_argument("-o", "--output", required=True,
                   help="output video (.avi: Motion JPEG, encoded on several threads, for video "
                        "rate; .mp4: mp4v, one encoder thread, smaller files) or folder")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="frames per model call (default: an exported model's batch, else the "
                        "spec's eval_batch_size)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast of PyTorch models on a GPU")
    p.add_argument("-t", "--threshold", type=_probability, default=0.5,
                   help="keep detections scoring at least this")
    p.add_argument("--include-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="draw masks (--no-include-mask: boxes only)")
    p.add_argument("--max-frames", type=_positive, default=None, help="stop after N frames")
    p.add_argument("--json", default=None, help="also write the statistics here")
    p.set_defaults(**_handler("deploy"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("spec", help="validate or show a spec file")
    p.add_argument("action", choices=["validate", "show"], help="validate, or print resolved")
    p.add_argument("spec", help="spec file")
    p.set_defaults(**_handler("spec"))
    add_data_commands(sub)
    for add in (_add_train, _add_evaluate, _add_infer, _add_export, _add_deploy):
        add(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mrcnn-helpers")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _one_line(exc: Exception) -> str:
    """The message of an error, without the worker traceback that DataLoader wraps around it."""
    text = str(exc)
    if "Original Traceback" in text:  # raised in a DataLoader worker and re-raised here
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if "Error: " in last else last
    return text


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The innermost subcommand parser of `args` (for its usage line in errors)."""
    current = parser
    for dest in ("command", "data_command"):
        name = getattr(args, dest, None)
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not name or not actions:
            break
        current = actions[0].choices.get(name, current)
    return current


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's own usage, not the top level's
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        if getattr(args, "func", None) is not None:
            return args.func(args)
        module, name = args.handler.split(":")
        return getattr(importlib.import_module(module), name)(args)
    except MrcnnError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
