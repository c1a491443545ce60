"""`mrcnn export -m MODEL -o model.onnx [--data-type fp32|fp16|int8]`: the static ONNX graph in
the asked precision, checked against PyTorch, with its accuracy at every precision side by side;
a TensorRT engine and DeepStream configs on request.

-o names the file of the asked precision. For fp16 and int8 the fp32 graph they are made from is
kept beside it as <stem>.fp32.onnx (the reference, and what TensorRT builds an fp32 engine
from). The accuracy table also measures the precisions not asked for, from temporary files.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.export.accuracy import VARIANTS, measure_accuracy
from mrcnn_helpers.export.calibration import CalibrationBatches
from mrcnn_helpers.export.deepstream import (
    APP_CONFIG,
    DEFAULT_CUSTOM_LIB,
    INFER_CONFIG,
    LABELS_FILE,
    write_deepstream_configs,
)
from mrcnn_helpers.export.onnx_export import export_onnx
from mrcnn_helpers.export.precision import convert_to_fp16, read_export_metadata
from mrcnn_helpers.export.quantize import quantize_int8
from mrcnn_helpers.export.tensorrt import build_engine
from mrcnn_helpers.export.verify import load_validation_images, verify_export
from mrcnn_helpers.fileio import describe_os_error
from mrcnn_helpers.inference.backends import OnnxRuntimeModel
from mrcnn_helpers.inference.loading import is_exported, load_model_file
from mrcnn_helpers.inference.metadata import sidecar_path
from mrcnn_helpers.inference.tensorrt import import_tensorrt
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import load_spec

from .common import check_outputs, command_inputs, memory_errors_named


def _outputs(args) -> dict:
    """{option: path} of every file export writes: the ONNX file of the asked precision, the
    fp32 reference beside it, the engine and its sidecar JSON, the INT8 calibration cache and
    the DeepStream files."""
    outputs = {"--output": args.output}
    if args.data_type != "fp32":
        outputs["--output's fp32 reference"] = str(_fp32_path(args))
    if args.engine:
        outputs["--engine"] = args.engine
        outputs["--engine's metadata"] = str(sidecar_path(args.engine))
    if args.cal_cache_file:
        outputs["--cal-cache-file"] = args.cal_cache_file
    if args.deepstream:
        for name in (INFER_CONFIG, APP_CONFIG, LABELS_FILE):
            outputs[f"--deepstream {name}"] = str(Path(args.deepstream) / name)
    return outputs


def _check_args(args, loaded=None, spec=None) -> None:
    """Refuse arguments that cannot work together, and outputs that would land on an input
    (the model, the spec, the calibration images, the files the spec names) or on each other;
    `spec` (-e's) and `loaded` (the model, with its own spec) add what they name."""
    if is_exported(args.model):
        raise MrcnnError(f"{args.model}: export starts from a training checkpoint, weights file "
                         "or results directory, not from an exported model")
    if args.gen_ds_config and not args.deepstream:
        args.deepstream = str(Path(args.output).parent / "deepstream")
    if args.key and args.deepstream:
        raise MrcnnError("--deepstream needs a plain ONNX file (DeepStream cannot read files "
                         "encrypted with --key): export once without --key for DeepStream")
    if args.deepstream and args.layout != "deepstream":
        raise MrcnnError("--deepstream needs --layout deepstream")
    if args.data_type == "int8" and not (args.cal_image_dir or args.cal_cache_file):
        raise MrcnnError("--data-type int8 needs calibration: --cal-image-dir DIR (images like "
                         "the deployment's, at least --batches x --cal-batch-size of them), or "
                         "a --cal-cache-file computed earlier for this model")
    for option, path in (("--output", args.output), ("--engine", args.engine)):
        if path and Path(path).is_dir():
            raise MrcnnError(f"{option} {path} is a folder: name the file to write")
    if args.deepstream and Path(args.deepstream).exists() and not Path(args.deepstream).is_dir():
        raise MrcnnError(f"--deepstream {args.deepstream} is a file: name a folder")
    # The calibration cache is read when present: it may exist, but not be another input.
    check_outputs(_outputs(args), command_inputs(args, loaded, spec))


@contextlib.contextmanager
def _os_errors_named(target):
    """An OSError (full disk, read-only folder) of the engine or DeepStream writers as one line
    naming what was being written."""
    try:
        yield
    except OSError as exc:
        raise MrcnnError(f"could not write {target}: {describe_os_error(exc)}") from None


def _fp32_path(args) -> Path:
    out = Path(args.output)
    return out if args.data_type == "fp32" else out.with_name(f"{out.stem}.fp32{out.suffix}")


def _write_variant(args, fp32: Path, meta) -> int:
    """The asked precision's file at -o, made from the fp32 graph; returns the number of images
    INT8 was calibrated on (0 otherwise, or when a cache gave the ranges)."""
    if args.data_type == "fp16":
        convert_to_fp16(fp32, args.output, exclude=args.fp16_exclude, key=args.key)
    elif args.data_type == "int8":
        batches = None
        if args.cal_image_dir:
            batches = CalibrationBatches(args.cal_image_dir, meta,
                                         batch_size=args.cal_batch_size or meta.batch_size,
                                         batches=args.batches)
        report = quantize_int8(fp32, args.output, batches, method=args.cal_method,
                               percentile=args.cal_percentile, cache_file=args.cal_cache_file,
                               exclude=args.int8_exclude, key=args.key)
        print(f"int8: {report.summary()}")
    if args.data_type != "fp32":
        print(f"{args.data_type} ONNX written to {args.output} (from {fp32})")
    return report.images if args.data_type == "int8" else 0


def _check(args, model, spec, fp32: Path, meta, calibrated_images: int = 0) -> None:
    """Parity of the fp32 graph with PyTorch, then the accuracy table of every precision."""
    try:
        images = load_validation_images(spec, min(args.verify_images, 16))
    except MrcnnError as exc:
        print(f"verification skipped: no validation images ({exc})")
        return
    onnx_model = OnnxRuntimeModel(fp32, key=args.key)
    report = verify_export(model, onnx_model, images, spec=spec, batch_size=meta.batch_size)
    print(f"parity pytorch vs onnx: {report.summary()}")
    if not report.ok:
        warnings.warn("the ONNX model does not reproduce the PyTorch model within tolerance on "
                      "these images (see above)", stacklevel=1)
    calibrates = bool(args.cal_image_dir or spec.data_config.train_image_dir
                      or args.data_type == "int8")
    variants = [v for v in VARIANTS if v != "onnx_int8" or calibrates]
    prebuilt = {f"onnx_{args.data_type}": args.output} if args.data_type != "fp32" else {}
    with tempfile.TemporaryDirectory(prefix="mrcnn-export-check-") as workdir:
        table = measure_accuracy(
            model, spec, workdir, onnx_path=fp32, batch_size=meta.batch_size,
            max_images=args.verify_images, cal_image_dir=args.cal_image_dir,
            batches=args.batches, cal_method=args.cal_method, percentile=args.cal_percentile,
            int8_exclude=args.int8_exclude, fp16_exclude=args.fp16_exclude, variants=variants,
            device=resolve_device(args.device), tolerance=args.ap_tolerance, prebuilt=prebuilt,
            calibrated_images=calibrated_images)
    print(f"COCO metrics on {table.eval_images} validation images, every precision:")
    print(table.format())


def run(args) -> int:
    with memory_errors_named("export"):
        return _run(args)


def _run(args) -> int:
    _check_args(args)
    if args.engine:
        import_tensorrt()  # fail before the export work when TensorRT is missing
    spec = load_spec(args.experiment_spec) if args.experiment_spec else None
    _check_args(args, spec=spec)
    loaded = load_model_file(args.model, spec=spec, device="cpu", key=args.key)
    _check_args(args, loaded)
    model, spec = loaded.model, loaded.spec
    fp32 = _fp32_path(args)
    meta = export_onnx(model, spec, fp32, batch_size=args.batch_size, layout=args.layout,
                       normalize_in_graph=args.normalize_in_graph, opset=args.opset,
                       class_names=loaded.class_names, category_ids=loaded.category_ids,
                       key=args.key)
    print(f"ONNX written to {fp32}: input {meta.input_name} "
          f"[{meta.batch_size}, 3, {meta.image_size[0]}, {meta.image_size[1]}], outputs "
          f"{', '.join(meta.output_names)}" + (" (encrypted)" if args.key else ""))
    calibrated = _write_variant(args, fp32, meta)
    if args.engine:
        with _os_errors_named(args.engine):
            path = build_engine(args.output, args.engine, workspace=args.workspace << 20,
                                key=args.key)
        print(f"engine written to {path} ({args.data_type}, strongly typed)")
    if args.verify_images > 0:
        _check(args, model, spec, fp32, meta, calibrated)
    if args.deepstream:
        with _os_errors_named(args.deepstream):
            paths = write_deepstream_configs(
                args.deepstream, read_export_metadata(args.output, args.key), args.output,
                engine_path=args.engine, custom_lib=args.ds_custom_lib or DEFAULT_CUSTOM_LIB,
                **({"video_uri": args.ds_video} if args.ds_video else {}))
        print("DeepStream: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0
