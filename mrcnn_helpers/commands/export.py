"""`mrcnn export -m MODEL -o model.onnx`: the static ONNX graph, checked against PyTorch, plus a
TensorRT engine and DeepStream configs on request."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.export.calibration import CalibrationBatches
from mrcnn_helpers.export.deepstream import (
    APP_CONFIG,
    DEFAULT_CUSTOM_LIB,
    INFER_CONFIG,
    LABELS_FILE,
    write_deepstream_configs,
)
from mrcnn_helpers.export.onnx_export import export_onnx
from mrcnn_helpers.export.tensorrt import build_engine, make_entropy_calibrator
from mrcnn_helpers.export.verify import (
    check_ap_drop,
    compare_ap,
    format_ap_table,
    load_validation_images,
    verify_export,
)
from mrcnn_helpers.fileio import describe_os_error
from mrcnn_helpers.inference.backends import OnnxRuntimeModel
from mrcnn_helpers.inference.loading import is_exported, load_model_file
from mrcnn_helpers.inference.metadata import sidecar_path
from mrcnn_helpers.inference.tensorrt import TensorRTModel, import_tensorrt
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import load_spec

from .common import check_outputs, command_inputs, memory_errors_named


def _outputs(args) -> dict:
    """{option: path} of every file export writes: the ONNX file, the engine, its sidecar JSON,
    the INT8 calibration cache (given or the engine's default) and the DeepStream files."""
    outputs = {"--output": args.output}
    if args.engine:
        outputs["--engine"] = args.engine
        outputs["--engine's metadata"] = str(sidecar_path(args.engine))
    if args.cal_cache_file or (args.engine and args.data_type == "int8"):
        outputs["--cal-cache-file"] = (args.cal_cache_file
                                       or str(Path(args.engine).with_suffix(".cal.bin")))
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


def _verify(args, model, spec, onnx_model, engine_model=None) -> None:
    """Parity on --verify-images validation images, then AP side by side."""
    try:
        images = load_validation_images(spec, args.verify_images)
    except MrcnnError as exc:
        print(f"verification skipped: no validation images ({exc})")
        return
    for name, exported in (("onnx", onnx_model), ("tensorrt", engine_model)):
        if exported is None:
            continue
        report = verify_export(model, exported, images, spec=spec,
                               batch_size=exported.meta.batch_size)
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
    with _os_errors_named(args.engine):
        path = build_engine(args.output, args.engine, data_type=args.data_type,
                            calibrator=calibrator, workspace=args.workspace << 20, key=args.key)
    print(f"engine written to {path} ({args.data_type})")
    return path


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
    meta = export_onnx(model, spec, args.output, batch_size=args.batch_size, layout=args.layout,
                       normalize_in_graph=args.normalize_in_graph, opset=args.opset,
                       class_names=loaded.class_names, category_ids=loaded.category_ids,
                       key=args.key)
    print(f"ONNX written to {args.output}: input {meta.input_name} "
          f"[{meta.batch_size}, 3, {meta.image_size[0]}, {meta.image_size[1]}], outputs "
          f"{', '.join(meta.output_names)}" + (" (encrypted)" if args.key else ""))
    engine_model = None
    if args.engine:
        _build_engine(args, meta)
    if args.verify_images > 0:
        onnx_model = OnnxRuntimeModel(args.output, key=args.key)
        if args.engine:
            engine_model = TensorRTModel(args.engine)
        model.to(resolve_device(args.device))
        _verify(args, model, spec, onnx_model, engine_model)
    if args.deepstream:
        if args.data_type == "int8" and not (args.cal_cache_file
                                             and Path(args.cal_cache_file).is_file()):
            raise MrcnnError("an INT8 DeepStream config needs a calibration cache: build one "
                             "with --engine ... --data-type int8 --cal-image-dir DIR, or pass an "
                             "existing --cal-cache-file")
        with _os_errors_named(args.deepstream):
            paths = write_deepstream_configs(
                args.deepstream, meta, args.output, engine_path=args.engine,
                data_type=args.data_type, calib_file=args.cal_cache_file,
                custom_lib=args.ds_custom_lib or DEFAULT_CUSTOM_LIB,
                **({"video_uri": args.ds_video} if args.ds_video else {}))
        print("DeepStream: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0
