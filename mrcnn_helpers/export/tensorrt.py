"""TensorRT engines from the exported ONNX graph: build (FP32 / FP16 / INT8), calibrate, run.

TensorRT is optional and imported only inside these functions. Written against TensorRT's
documented Python API of versions 8.6 to 10.x (ONNX parser, builder config with memory pools,
IInt8EntropyCalibrator2, named I/O tensors with execute_async_v3). It cannot be installed on this
project's machines, so this module is tested there only up to the TensorRT calls (calibration
batches, cache handling, dtype mapping, output decoding); the tests that need TensorRT skip.

    build_engine("model.onnx", "model.plan", data_type="int8",
                 calibrator=make_entropy_calibrator(batches, "cal.bin"))
    model = TensorRTModel("model.plan")          # same interface as the PyTorch model
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mrcnn_helpers.inference.metadata import ExportError, read_onnx_metadata, write_sidecar
from mrcnn_helpers.inference.tensorrt import TensorRTUnavailable, import_tensorrt  # noqa: F401

from .calibration import CalibrationBatches, CalibrationCache

DATA_TYPES = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE = 4 << 30  # bytes


def network_mode(data_type: str) -> int:
    """DeepStream's network-mode for a data type (0 = FP32, 1 = INT8, 2 = FP16)."""
    check_data_type(data_type)
    return {"fp32": 0, "int8": 1, "fp16": 2}[data_type]


def check_data_type(data_type: str) -> str:
    if data_type not in DATA_TYPES:
        raise ExportError(f"unknown data type {data_type!r}; valid: {', '.join(DATA_TYPES)}")
    return data_type


def make_entropy_calibrator(batches: CalibrationBatches | None, cache_file):
    """A trt.IInt8EntropyCalibrator2 over `batches` (None: only an existing cache is used).

    TensorRT first asks for the cache; when `cache_file` holds one, no image is read. Otherwise
    it pulls the batches (copied to one CUDA buffer) and hands back the cache, which is written
    to `cache_file` for the next build and for DeepStream's int8-calib-file.
    """
    trt = import_tensorrt()
    cache = CalibrationCache(cache_file)
    if batches is None and not cache.exists():
        raise ExportError("INT8 needs calibration: pass --cal-image-dir (images like the "
                          "deployment's), or an existing --cal-cache-file")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.cache = cache
            self.batches = batches
            self._iterator = iter(batches) if batches is not None else iter(())
            self._buffer = None

        def get_batch_size(self):
            return batches.batch_size if batches is not None else 1

        def get_batch(self, names):
            batch = next(self._iterator, None)
            if batch is None:
                return None
            if self._buffer is None:
                self._buffer = torch.empty(batch.shape, dtype=torch.float32, device="cuda")
            self._buffer.copy_(torch.from_numpy(batch))
            torch.cuda.synchronize()
            return [int(self._buffer.data_ptr())] * len(names)

        def read_calibration_cache(self):
            return self.cache.read()

        def write_calibration_cache(self, data):
            self.cache.write(bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path, engine_path, *, data_type: str = "fp32", calibrator=None,
                 workspace: int = DEFAULT_WORKSPACE, key: str | None = None) -> Path:
    """Build and write a TensorRT engine for an exported ONNX file; returns the engine path.

    data_type: fp32, fp16 (FP16 kernels allowed), int8 (INT8 with FP16 fallback; needs
    `calibrator` from make_entropy_calibrator). workspace: builder memory pool in bytes.
    Writes `<engine>.json` with the export metadata next to the engine. The engine is specific
    to the GPU and TensorRT version that built it.
    """
    trt = import_tensorrt()
    check_data_type(data_type)
    import onnx

    from mrcnn_helpers.crypto import read_maybe_encrypted

    data = read_maybe_encrypted(onnx_path, key)
    meta = read_onnx_metadata(onnx.load_model_from_string(data), str(onnx_path))
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # required before TRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if data_type in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if data_type == "int8":
        if calibrator is None:
            raise ExportError("INT8 needs a calibrator (make_entropy_calibrator)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log "
                          "above); try a larger workspace or another data type")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    extra = dict(meta.extra, data_type=data_type, tensorrt_version=str(trt.__version__))
    from dataclasses import replace

    write_sidecar(engine_path, replace(meta, extra=extra))
    return engine_path


