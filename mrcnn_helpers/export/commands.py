"""`mrcnn export` and `mrcnn deploy` subcommands (added to the CLI by add_export_commands).

    mrcnn export -m MODEL -e SPEC -o model.onnx [--batch-size N] [--layout deepstream|compact]
                 [--engine model.plan --data-type fp32|fp16|int8
                  --cal-image-dir DIR --batches N --cal-batch-size B --cal-cache-file FILE]
                 [--deepstream DIR] [--key KEY] [--verify-images N]
    mrcnn deploy -m MODEL|model.onnx|model.plan -i VIDEO|DIR|RTSP|webcam -o OUT.mp4|DIR

MODEL for export is a checkpoint or a results directory (its latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_pytorch(args, device):
    from mrcnn_helpers.spec import load_spec

    from mrcnn_helpers.inference.backends import ENGINE_SUFFIXES, ONNX_SUFFIXES, load_inference_model

    if Path(args.model).suffix.lower() in ONNX_SUFFIXES + ENGINE_SUFFIXES:
        raise MrcnnError(f"{args.model}: export starts from a training checkpoint (or results "
                         "directory), not from an exported model")
    spec = load_spec(args.experiment_spec) if args.experiment_spec else None
    return load_inference_model(args.model, spec=spec, device=device, key=args.key)


def _verify(args, model, spec, onnx_model, engine_model=None) -> None:
    """Parity on --verify-images validation images, then AP side by side."""
    from .verify import (
        check_ap_drop,
        compare_ap,
        format_ap_table,
        load_validation_images,
        verify_export,
    )

    try:
        images = load_validation_images(spec, args.verify_images)
    except MrcnnError as exc:
        print(f"verification skipped: no validation images ({exc})")
        return
    for name, exported in (("onnx", onnx_model), ("tensorrt", engine_model)):
        if exported is None:
            continue
        report = verify_export(model, exported, images, batch_size=exported.meta.batch_size)
        print(f"parity pytorch vs {name}: {report.summary()}")
        if not report.ok and name == "onnx":
            warnings.warn("the ONNX model does not reproduce the PyTorch model within tolerance "
                          "on these images (see above)", stacklevel=1)
    models = {"pytorch": model, "onnx": onnx_model}
    if engine_model is not None:
        models["tensorrt"] = engine_model
    results = compare_ap(models, spec, max_images=args.verify_images)
    print(f"COCO metrics on {len(images)} validation images:")
    print(format_ap_table(results))
    if engine_model is not None:
        check_ap_drop(results["pytorch"], results["tensorrt"], tolerance=args.ap_tolerance,
                      name=f"TensorRT {args.data_type} engine")


def _build_engine(args, meta):
    from .calibration import CalibrationBatches
    from .tensorrt import build_engine, make_entropy_calibrator

    calibrator = None
    if args.data_type == "int8":
        batches = None
        if args.cal_image_dir:
            batches = CalibrationBatches(args.cal_image_dir, meta,
                                         batch_size=args.cal_batch_size or meta.batch_size,
                                         batches=args.batches)
        cache = args.cal_cache_file or str(Path(args.engine).with_suffix(".cal.bin"))
        args.cal_cache_file = cache
        calibrator = make_entropy_calibrator(batches, cache)
    path = build_engine(args.output, args.engine, data_type=args.data_type, calibrator=calibrator,
                        workspace=args.workspace << 20, key=args.key)
    print(f"engine written to {path} ({args.data_type})")
    return path


def cmd_export(args) -> int:
    from .onnx_export import export_onnx

    if args.key and args.deepstream:
        raise MrcnnError("--deepstream needs a plain ONNX file (DeepStream cannot read files "
                         "encrypted with --key): export once without --key for DeepStream")
    if args.deepstream and args.layout != "deepstream":
        raise MrcnnError("--deepstream needs --layout deepstream")
    if args.engine:
        from .tensorrt import import_tensorrt

        import_tensorrt()  # fail before the export work when TensorRT is missing
    device = _device(args.device)
    model, spec, class_names, category_ids = _load_pytorch(args, "cpu")
    meta = export_onnx(model, spec, args.output, batch_size=args.batch_size, layout=args.layout,
                       normalize_in_graph=args.normalize_in_graph, opset=args.opset,
                       class_names=class_names, category_ids=category_ids, key=args.key)
    print(f"ONNX written to {args.output}: input {meta.input_name} "
          f"[{meta.batch_size}, 3, {meta.image_size[0]}, {meta.image_size[1]}], outputs "
          f"{', '.join(meta.output_names)}" + (" (encrypted)" if args.key else ""))
    engine_model = None
    if args.engine:
        _build_engine(args, meta)
    if args.verify_images > 0:
        from mrcnn_helpers.inference.backends import OnnxRuntimeModel

        onnx_model = OnnxRuntimeModel(args.output, key=args.key)
        if args.engine:
            from mrcnn_helpers.inference.tensorrt import TensorRTModel

            engine_model = TensorRTModel(args.engine)
        model.to(device)
        _verify(args, model, spec, onnx_model, engine_model)
    if args.deepstream:
        from .deepstream import DEFAULT_CUSTOM_LIB, write_deepstream_configs

        if args.data_type == "int8" and not (args.cal_cache_file
                                             and Path(args.cal_cache_file).is_file()):
            raise MrcnnError("an INT8 DeepStream config needs a calibration cache: build one "
                             "with --engine ... --data-type int8 --cal-image-dir DIR, or pass an "
                             "existing --cal-cache-file")
        paths = write_deepstream_configs(
            args.deepstream, meta, args.output, engine_path=args.engine,
            data_type=args.data_type, calib_file=args.cal_cache_file,
            custom_lib=args.ds_custom_lib or DEFAULT_CUSTOM_LIB,
            **({"video_uri": args.ds_video} if args.ds_video else {}))
        print("DeepStream: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0


def cmd_deploy(args) -> int:
    from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
    from mrcnn_helpers.spec import load_spec

    from mrcnn_helpers.inference.backends import load_inference_model

    spec = load_spec(args.experiment_spec) if args.experiment_spec else None
    device = _device(args.device)
    model, spec, class_names, _ = load_inference_model(args.model, spec=spec, device=device,
                                                       key=args.key)
    source = open_source(args.input)
    try:
        sink = open_sink(args.output, fps=source.fps)
    except BaseException:
        source.close()
        raise
    stats = run_deploy(model, spec, class_names, source, sink, batch_size=args.batch_size,
                       threshold=args.threshold, include_mask=not args.no_mask,
                       precision=args.precision, device=device, max_frames=args.max_frames)
    print(stats.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    return 0


def add_export_commands(subparsers) -> None:
    """Add `export` and `deploy` to the `mrcnn` argparse subparsers."""
    from .tensorrt import DATA_TYPES

    p = subparsers.add_parser("export", help="export to ONNX (+ TensorRT engine, DeepStream "
                                             "config), verified against PyTorch")
    p.add_argument("-m", "--model", required=True, help="checkpoint file or results directory")
    p.add_argument("-e", "--experiment-spec", default=None,
                   help="spec file (default: the checkpoint's)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch of the graph")
    p.add_argument("--layout", choices=["deepstream", "compact"], default="deepstream")
    p.add_argument("--normalize-in-graph", action=argparse.BooleanOptionalAction,
                   default=True, help="graph takes 0..255 pixels (default); --no-normalize-in-"
                                      "graph leaves mean/scale to DeepStream's offsets")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--engine", default=None, help="also build a TensorRT engine here (.plan)")
    p.add_argument("--data-type", choices=DATA_TYPES, default="fp16")
    p.add_argument("--workspace", type=int, default=4096, help="TensorRT workspace, MiB")
    p.add_argument("--cal-image-dir", default=None, help="INT8 calibration images")
    p.add_argument("--batches", type=int, default=10, help="INT8 calibration batches")
    p.add_argument("--cal-batch-size", type=int, default=None,
                   help="INT8 calibration batch (default and only valid value: --batch-size)")
    p.add_argument("--cal-cache-file", default=None,
                   help="INT8 calibration cache: reused when present, written otherwise")
    p.add_argument("--deepstream", default=None, metavar="DIR",
                   help="write nvinfer + deepstream-app configs and labels here")
    p.add_argument("--ds-custom-lib", default=None,
                   help="DeepStream parser library with NvDsInferParseCustomMrcnnTLTV2")
    p.add_argument("--ds-video", default=None,
                   help="URI of the deepstream-app config's source (default: DeepStream's sample)")
    p.add_argument("-k", "--key", default=None,
                   help="encrypt the ONNX file with this passphrase (and read an encrypted "
                        "checkpoint)")
    p.add_argument("--verify-images", type=int, default=4,
                   help="validation images for parity and AP checks (0 = skip)")
    p.add_argument("--ap-tolerance", type=float, default=0.01,
                   help="warn when the engine's AP is lower than PyTorch's by more than this")
    p.add_argument("--device", default=None, help="device of the PyTorch model in verification")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("deploy", help="annotate a video / stream / image folder; prints "
                                             "FPS and latency")
    p.add_argument("-m", "--model", required=True,
                   help="checkpoint, results directory, .onnx or TensorRT .plan")
    p.add_argument("-e", "--experiment-spec", default=None,
                   help="spec file (default: the model's)")
    p.add_argument("-i", "--input", required=True,
                   help="video file, image directory, rtsp:// URL or webcam[:N]")
    p.add_argument("-o", "--output", required=True, help="output .mp4 or directory")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="PyTorch models on a GPU (autocast)")
    p.add_argument("-t", "--threshold", type=float, default=0.5)
    p.add_argument("--no-mask", action="store_true", help="draw boxes only")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("-k", "--key", default=None, help="key of an encrypted model")
    p.add_argument("--json", default=None, help="also write the statistics here")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_deploy)
