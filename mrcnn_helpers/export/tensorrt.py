"""TensorRT engines from an exported ONNX graph, for TensorRT 10.x and 11.x alike.

The network is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11
networks always are): every layer runs in the type its tensors have in the ONNX file. So the
engine's precision is the ONNX file's, chosen when it was written:

    fp32   export_onnx(...)                               -> model.onnx
    fp16   precision.convert_to_fp16(model.onnx, ...)     -> model.fp16.onnx
    int8   quantize.quantize_int8(model.onnx, ..., batches)  -> model.int8.onnx (Q/DQ nodes)

and `build_engine(that_file, "model.plan")` needs no precision flag, calibrator or cache: the
APIs that did that (BuilderFlag.FP16/INT8, config.int8_calibrator, IInt8EntropyCalibrator2) were
deprecated in 10.x and are gone in 11.x. tools/trt_api_names.py checks every TensorRT name this
module and inference/tensorrt.py use against the vendored API lists of 10.x and 11.x releases.

TensorRT is optional and imported only when an engine is built. It cannot be installed on this
project's machines, so the TensorRT calls are tested where it is installed (the tests skip
elsewhere); everything before them (precision detection, argument checks) is tested here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mrcnn_helpers.crypto import read_maybe_encrypted
from mrcnn_helpers.fileio import atomic_write, check_output_path
from mrcnn_helpers.inference.metadata import ExportError, read_onnx_metadata, write_sidecar
from mrcnn_helpers.inference.tensorrt import TensorRTUnavailable, import_tensorrt

from .precision import PRECISIONS, graph_precision

DATA_TYPES = PRECISIONS
DEFAULT_WORKSPACE = 4 << 30  # bytes
MIN_TENSORRT_MAJOR = 10  # strongly typed networks with Q/DQ: 10.0 and later


def network_mode(data_type: str) -> int:
    """DeepStream's network-mode for a data type (0 = FP32, 1 = INT8, 2 = FP16)."""
    check_data_type(data_type)
    return {"fp32": 0, "int8": 1, "fp16": 2}[data_type]


def check_data_type(data_type: str) -> str:
    if data_type not in DATA_TYPES:
        raise ExportError(f"unknown data type {data_type!r}; valid: {', '.join(DATA_TYPES)}")
    return data_type


def how_to_make(precision: str) -> str:
    """The call (and CLI option) that writes an ONNX graph of `precision`."""
    return {"fp32": "export_onnx (mrcnn export)",
            "fp16": "convert_to_fp16 (mrcnn export --data-type fp16)",
            "int8": "quantize_int8 with calibration images (mrcnn export --data-type int8 "
                    "--cal-image-dir DIR)"}[precision]


def check_precision(model_proto, data_type: str | None, source: str) -> str:
    """The graph's precision; ExportError when `data_type` asks for another one."""
    precision = graph_precision(model_proto)
    if data_type is not None and check_data_type(data_type) != precision:
        raise ExportError(
            f"{source} holds the {precision} graph, but an engine in {data_type} was asked for: "
            f"TensorRT builds what the graph says (strongly typed); write the {data_type} graph "
            f"with {how_to_make(data_type)} and build from that file")
    return precision


def _tensorrt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return MIN_TENSORRT_MAJOR


def build_engine(onnx_path, engine_path, *, data_type: str | None = None,
                 workspace: int = DEFAULT_WORKSPACE, key: str | None = None) -> Path:
    """Build and write a TensorRT engine for an exported ONNX file; returns the engine path.

    The precision is the graph's (see the module docstring); data_type, when given, must match
    it (a check, not a switch). workspace: builder memory pool in bytes. key: passphrase of an
    encrypted ONNX file. Writes `<engine>.json` (the export metadata, with data_type and the
    TensorRT version) next to the engine. An engine is specific to the GPU and TensorRT version
    that built it.
    """
    trt = import_tensorrt()
    if _tensorrt_major(trt) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is too old: engines are built as strongly typed "
            f"networks from explicitly quantized graphs, which needs TensorRT >= "
            f"{MIN_TENSORRT_MAJOR} (an NGC container of 2024 or later)")
    import onnx

    check_output_path(engine_path, [onnx_path], option="engine")
    data = read_maybe_encrypted(onnx_path, key)
    proto = onnx.load_model_from_string(data)
    meta = read_onnx_metadata(proto, str(onnx_path))
    precision = check_precision(proto, data_type, str(onnx_path))
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log "
                          "above); try a larger --workspace")
    engine_path = Path(engine_path)
    atomic_write(engine_path, bytes(serialized), error=ExportError, what="TensorRT engine")
    extra = dict(meta.extra, data_type=precision, tensorrt_version=str(trt.__version__))
    write_sidecar(engine_path, replace(meta, extra=extra))
    return engine_path
