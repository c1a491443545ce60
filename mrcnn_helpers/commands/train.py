"""`mrcnn train -e SPEC -r RESULTS_DIR [--gpus N]`: train, or resume from the newest checkpoint."""

import os
import sys

from mrcnn_helpers.engine.distributed import launch_processes
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import load_spec
from mrcnn_helpers.workflow import train


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


def run(args) -> int:
    if args.key:
        print("note: -k is accepted for TLT command lines; training checkpoints are written "
              "unencrypted (encrypt what you share with `mrcnn export -k`)", file=sys.stderr)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        load_spec(args.experiment_spec)  # fail here, once, on a bad spec
        argv = sys.argv[1:] if args.argv is None else args.argv
        argv = without_option(argv, "--gpus")
        return launch_processes(args.gpus, argv)
    spec = load_spec(args.experiment_spec)
    result = train(spec, args.results_dir, device=resolve_device(args.device),
                   max_steps=args.max_steps, sync_bn=args.sync_bn,
                   tlt_log=args.tlt_log)
    print(f"checkpoint: {result['checkpoint']}")
    return 0
