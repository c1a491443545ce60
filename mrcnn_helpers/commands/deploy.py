"""`mrcnn deploy -m MODEL -i SOURCE -o OUT`: the streaming pipeline with FPS and latency."""

import sys

from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
from mrcnn_helpers.deploy.io import import_cv2, uses_opencv
from mrcnn_helpers.fileio import atomic_write_json

from .common import load_for_inference, memory_errors_named


def run(args) -> int:
    with memory_errors_named("deploy"):
        return _run(args)


def _run(args) -> int:
    if uses_opencv(args.input, args.output):
        # Before the model: OpenCV's native start-up crashes (SIGSEGV) instead of failing when
        # the address space is nearly used up (a `ulimit -v` of 4 GiB with ONNX Runtime loaded).
        import_cv2(f"deploy -i {args.input} -o {args.output}")
    # -o and --json may land on nothing the run reads: checked before and after the model is
    # read (its spec names more files), and by open_sink against the source's own files.
    predictor = load_for_inference(args, precision=args.precision,
                                   outputs={"output": args.output})
    source = open_source(args.input)
    try:
        sink = open_sink(args.output, fps=source.fps,
                         inputs=source.inputs + [args.model, predictor.source])
    except BaseException:
        source.close()
        raise
    stats = run_deploy(predictor, source, sink, batch_size=args.batch_size,
                       threshold=args.threshold, include_mask=args.include_mask,
                       max_frames=args.max_frames)
    print(stats.summary())
    skipped = list(getattr(source, "skipped", []))
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: " + "; ".join(skipped),
              file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, {**stats.as_dict(), "skipped_images": skipped},
                          what="deploy statistics")
    return 0
