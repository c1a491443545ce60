"""Export and deployment artifacts: static ONNX graph, ONNX Runtime / TensorRT backends, INT8
calibration, DeepStream configs, verification against PyTorch, optional encryption.

    from mrcnn_helpers.export import export_onnx, OnnxRuntimeModel, verify_export
    meta = export_onnx(model, spec, "model.onnx", layout="deepstream")
    report = verify_export(model, OnnxRuntimeModel("model.onnx"), images)
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
from .tensorrt import build_engine, make_entropy_calibrator
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
    "OnnxRuntimeModel", "ParityReport", "TensorRTModel", "TensorRTUnavailable", "build_engine",
    "check_ap_drop", "compare_ap", "compare_detections", "decode_outputs", "decrypt_bytes",
    "encrypt_bytes", "encrypt_file", "export_onnx", "fold_input_scale", "format_ap_table",
    "is_encrypted", "load_inference_model", "make_entropy_calibrator", "read_config",
    "verify_export", "write_deepstream_configs",
]
