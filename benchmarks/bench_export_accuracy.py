"""Accuracy of every deployment precision, in one table: PyTorch fp32 (and bf16 on CUDA), the
ONNX fp32 graph, its FP16 graph and its INT8 Q/DQ graph (the files TensorRT engines are built
from), each on the spec's validation images (export.accuracy.measure_accuracy).

    # a trained model (results directory or checkpoint), e.g. the R50 synthetic run:
    python benchmarks/bench_export_accuracy.py --results results/r50 --workdir /tmp/acc \
        --batches 100 --cal-method max
    # or train one from a spec first (CPU is fine for a tiny spec):
    python benchmarks/bench_export_accuracy.py --spec spec.txt --train-steps 300 --workdir /tmp/acc

Prints the date, the versions, the table and its warnings; --json writes them too. Calibration
uses --cal-image-dir, else the spec's training images (the table is measured on validation).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

from mrcnn_helpers.export.accuracy import VARIANTS, measure_accuracy
from mrcnn_helpers.fileio import atomic_write_json
from mrcnn_helpers.inference.loading import load_model_file
from mrcnn_helpers.spec import load_spec
from mrcnn_helpers.workflow import train


def versions() -> str:
    import onnx
    import onnxruntime

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    try:
        import tensorrt

        parts.append(f"tensorrt {tensorrt.__version__}")
    except ImportError:
        parts.append("tensorrt not installed")
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads)")
    return ", ".join(parts) + f"; {device}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=None, help="results directory or checkpoint")
    p.add_argument("--spec", default=None, help="spec (default: the checkpoint's)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the spec for this many steps into WORKDIR/results first")
    p.add_argument("--workdir", required=True, help="where the ONNX variants are written")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch of the graphs")
    p.add_argument("--max-images", type=int, default=None, help="validation images (all)")
    p.add_argument("--deviation-images", type=int, default=16)
    p.add_argument("--cal-image-dir", default=None)
    p.add_argument("--batches", type=int, default=10, help="calibration batches")
    p.add_argument("--cal-method", default="max", choices=["entropy", "percentile", "max"])
    p.add_argument("--cal-percentile", type=float, default=99.99)
    p.add_argument("--cal-cache-file", default=None)
    p.add_argument("--int8-exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--fp16-exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    spec = load_spec(args.spec) if args.spec else None
    results = args.results
    if args.train_steps:
        if spec is None:
            p.error("--train-steps needs --spec")
        results = workdir / "results"
        train(spec, results, device=args.device, max_steps=args.train_steps, evaluate_fn=None)
    if results is None:
        p.error("pass --results, or --spec with --train-steps")
    model, spec, _, _ = load_model_file(results, spec=spec, device=args.device)
    table = measure_accuracy(
        model, spec, workdir, batch_size=args.batch_size, max_images=args.max_images,
        deviation_images=args.deviation_images, cal_image_dir=args.cal_image_dir,
        batches=args.batches, cal_method=args.cal_method, percentile=args.cal_percentile,
        cal_cache_file=args.cal_cache_file, int8_exclude=args.int8_exclude,
        fp16_exclude=args.fp16_exclude, variants=args.variants, device=args.device,
        threads=args.threads)
    header = (f"{datetime.date.today().isoformat()}; {versions()}\nmodel {results}; spec "
              f"{spec.source}; val {spec.data_config.val_json_file}")
    print(header)
    print(table.format())
    if args.json:
        atomic_write_json(args.json, dict(table.as_dict(), header=header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
