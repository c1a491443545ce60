"""Running TensorRT engines: a built `.plan` behind the backend interface of inference.backends.

TensorRT is optional and imported only when an engine is loaded. Written against the Python API
that TensorRT 10.x and 11.x share: Runtime.deserialize_cuda_engine, named I/O tensors
(num_io_tensors, get_tensor_name / _shape / _dtype / _mode), set_tensor_address and
execute_async_v3 on the caller's CUDA stream; tools/trt_api_names.py checks each name against
the vendored API lists of 10.x and 11.x releases. An engine built from an fp16 or int8 (Q/DQ)
graph keeps the graph's float32 inputs and outputs, so feeding and decoding are the same for
every precision. TensorRT cannot be installed on this project's machines: tests cover what runs
without it (dtype mapping, output decoding) and skip the rest. Building engines is export's job
(mrcnn_helpers.export.tensorrt).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .backends import ExportedModel
from .metadata import ExportError, read_sidecar

# Engines are read whole into memory; a Mask R-CNN engine is a few hundred MB at most.
MAX_ENGINE_BYTES = 8 << 30

class TensorRTUnavailable(ExportError):
    """TensorRT's Python package (or a CUDA GPU) is not available."""


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed. Its Python package comes with NVIDIA's NGC containers "
            "(nvcr.io/nvidia/tensorrt:<yy.mm>-py3, nvcr.io/nvidia/pytorch:<yy.mm>-py3, "
            "DeepStream's), or `pip install tensorrt` where NVIDIA's package index is reachable. "
            "Without it: run the .onnx with ONNX Runtime, or let DeepStream build the engine "
            "from the .onnx (see --deepstream).") from None
    return tensorrt


def torch_dtype(numpy_dtype) -> torch.dtype:
    """torch dtype of a numpy dtype (TensorRT reports tensor types through trt.nptype)."""
    mapping = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
               np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
               np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
               np.dtype(np.bool_): torch.bool}
    try:
        return mapping[np.dtype(numpy_dtype)]
    except KeyError:
        raise ExportError(f"engine tensor type {numpy_dtype} is not supported here") from None


# TensorRT DataType member names -> torch dtypes (by name: trt.nptype has no bfloat16).
_TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
               "INT8": torch.int8, "INT32": torch.int32, "INT64": torch.int64,
               "BOOL": torch.bool, "UINT8": torch.uint8}


def torch_dtype_of(trt_dtype) -> torch.dtype:
    """torch dtype of a TensorRT DataType (as engine.get_tensor_dtype returns it)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return _TRT_DTYPES[name]
    except KeyError:
        raise ExportError(f"engine tensor type {name} is not supported here (supported: "
                          f"{', '.join(_TRT_DTYPES)})") from None


class TensorRTModel(ExportedModel):
    """A TensorRT engine behind the model interface (see backends.ExportedModel).

    Inputs and outputs live in CUDA tensors allocated once; results are copied to the host.
    """

    backend = "tensorrt"

    def __init__(self, engine_path, *, device=None):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT engines need a CUDA GPU")
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise ExportError(f"TensorRT engine not found: {engine_path}")
        size = engine_path.stat().st_size
        if size > MAX_ENGINE_BYTES:  # read whole into memory below: bound it first
            raise ExportError(f"{engine_path} is {size} bytes; a Mask R-CNN engine is far below "
                              f"{MAX_ENGINE_BYTES >> 30} GiB: is it an engine?")
        super().__init__(read_sidecar(engine_path), str(engine_path))
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise ExportError(f"TensorRT runs on CUDA devices, not {self.device}")
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {engine_path}: built by another TensorRT "
                              "version or for another GPU? Rebuild it here")
        self.context = self.engine.create_execution_context()
        self.buffers, self.output_names = {}, []
        with torch.cuda.device(self.device):
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                shape = tuple(self.engine.get_tensor_shape(name))
                dtype = torch_dtype_of(self.engine.get_tensor_dtype(name))
                self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, self.buffers[name].data_ptr())
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    self.output_names.append(name)
        if self.meta.input_name not in self.buffers:
            raise ExportError(f"{engine_path} has no input {self.meta.input_name!r}")

    def _run(self, batch: np.ndarray) -> dict:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            self.buffers[self.meta.input_name].copy_(torch.from_numpy(batch), non_blocking=True)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"TensorRT execution failed for {self.source}")
            out = {name: self.buffers[name].to("cpu", non_blocking=True)
                   for name in self.output_names}
            stream.synchronize()
        return out
