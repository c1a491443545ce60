"""`mrcnn deploy -m MODEL -i SOURCE -o OUT`: the streaming pipeline with FPS and latency."""

from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
from mrcnn_helpers.fileio import atomic_write_json, check_output_path

from .common import load_for_inference


def run(args) -> int:
    if args.json:
        check_output_path(args.json, [args.model, args.input], option="--json")
    predictor = load_for_inference(args, precision=args.precision)
    source = open_source(args.input)
    try:
        sink = open_sink(args.output, fps=source.fps, inputs=source.inputs + [args.model])
    except BaseException:
        source.close()
        raise
    stats = run_deploy(predictor, source, sink, batch_size=args.batch_size,
                       threshold=args.threshold, include_mask=args.include_mask,
                       max_frames=args.max_frames)
    print(stats.summary())
    if args.json:
        atomic_write_json(args.json, stats.as_dict(), what="deploy statistics")
    return 0
