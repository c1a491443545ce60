"""`mrcnn train -e SPEC -r RESULTS_DIR [--gpus N]`: train, or resume from the newest checkpoint."""

import fnmatch
import os
import re
import sys
from pathlib import Path

from mrcnn_helpers.engine.distributed import launch_processes
from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.fileio import check_output_path
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import format_spec, load_spec
from mrcnn_helpers.workflow import train

from .common import memory_errors_named, spec_inputs

# What training writes into RESULTS_DIR (engine.checkpoint, engine.artifacts, the trainer).
WRITTEN = ("spec.txt", "train.log", "results.csv", "best.json", "model.best.pth",
           "model.weights.pth", "model.step-*.pth", "metrics_step-*.json", ".lock")


def without_option(argv: list[str], name: str) -> list[str]:
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


def check_results_dir(results_dir, spec_path, spec) -> None:
    """Refuse a results directory where training would write over what it reads.

    It may not be an image folder or a data file of the spec, nor lie inside an input folder
    (check_output_path; it may hold other files). No input may sit where training writes,
    replaces or prunes one of its files (WRITTEN), except the spec as RESULTS_DIR/spec.txt when
    it is the copy training wrote (resuming from it rewrites the same text).
    """
    inputs = [spec_path, *spec_inputs(spec)]
    check_output_path(results_dir, inputs, option="results directory", allow_inside=True)
    results = Path(os.path.abspath(results_dir)).resolve()
    for given in inputs:
        path = Path(os.path.abspath(given)).resolve()
        if path.parent != results or not any(fnmatch.fnmatchcase(path.name, pattern)
                                             for pattern in WRITTEN):
            continue
        if given == spec_path and path.name == "spec.txt" and _is_copy(path, spec):
            continue
        raise MrcnnError(f"{given} lies where training writes its {path.name} in the results "
                         f"directory {results_dir}: it would be overwritten (or pruned); move "
                         "it, or use another results directory")


def _is_copy(path: Path, spec) -> bool:
    """Whether `path` holds the spec copy training writes for `spec` (its header names the file
    it was resolved from, which rewriting may change; nothing else differs)."""
    def body(text):
        return re.sub(r"Resolved from: .*", "", text)

    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return body(text) == body(format_spec(spec))


def run(args) -> int:
    with memory_errors_named("train"):
        return _run(args)


def _run(args) -> int:
    if args.key:
        print("note: -k is accepted for TLT command lines; training checkpoints are written "
              "unencrypted (encrypt what you share with `mrcnn export -k`)", file=sys.stderr)
    spec = load_spec(args.experiment_spec)
    check_results_dir(args.results_dir, args.experiment_spec, spec)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        argv = sys.argv[1:] if args.argv is None else args.argv
        argv = without_option(argv, "--gpus")
        return launch_processes(args.gpus, argv)
    result = train(spec, args.results_dir, device=resolve_device(args.device),
                   max_steps=args.max_steps, sync_bn=args.sync_bn,
                   tlt_log=args.tlt_log)
    print(f"checkpoint: {result['checkpoint']}")
    return 0
