"""Export and deployment artifacts: static ONNX graph, its FP16 and INT8 (Q/DQ) variants,
ONNX Runtime / TensorRT backends, DeepStream configs, verification against PyTorch, the accuracy
table of every precision, optional encryption.

    from mrcnn_helpers.export import export_onnx, OnnxRuntimeModel, verify_export
    meta = export_onnx(model, spec, "model.onnx", layout="deepstream")
    report = verify_export(model, OnnxRuntimeModel("model.onnx"), images)
    convert_to_fp16("model.onnx", "model.fp16.onnx")
    quantize_int8("model.onnx", "model.int8.onnx", CalibrationBatches(DIR, meta, batch_size=1,
                                                                      batches=100))
    build_engine("model.int8.onnx", "model.int8.plan")   # TensorRT 10 / 11, strongly typed
"""

from mrcnn_helpers.crypto import (
    EncryptionError,
    decrypt_bytes,
    encrypt_bytes,
    encrypt_file,
    is_encrypted,
)
from mrcnn_helpers.inference.backends import (
    ExportedModel,
    OnnxRuntimeModel,
    decode_outputs,
    load_inference_model,
)
from mrcnn_helpers.inference.metadata import ExportError, ExportMetadata
from mrcnn_helpers.inference.tensorrt import TensorRTModel, TensorRTUnavailable

from .calibration import CalibrationBatches, CalibrationCache, CalibrationError
from .deepstream import read_config, write_deepstream_configs
from .graph import ExportableMaskRCNN, fold_input_scale
from .onnx_export import export_onnx
from .precision import convert_to_fp16, graph_precision, read_export_metadata
from .quantize import QuantizeReport, quantize_int8
from .tensorrt import build_engine
from .verify import (
    AccuracyWarning,
    ParityReport,
    check_ap_drop,
    compare_ap,
    compare_detections,
    format_ap_table,
    verify_export,
)

__all__ = [
    "AccuracyWarning", "CalibrationBatches", "CalibrationCache", "CalibrationError",
    "EncryptionError", "ExportError", "ExportMetadata", "ExportableMaskRCNN", "ExportedModel",
    "OnnxRuntimeModel", "ParityReport", "QuantizeReport", "TensorRTModel", "TensorRTUnavailable",
    "build_engine", "check_ap_drop", "compare_ap", "compare_detections", "convert_to_fp16",
    "decode_outputs", "decrypt_bytes", "encrypt_bytes", "encrypt_file", "export_onnx",
    "fold_input_scale", "format_ap_table", "graph_precision", "is_encrypted",
    "load_inference_model", "quantize_int8", "read_config", "read_export_metadata",
    "verify_export",
    "write_deepstream_configs",
]
