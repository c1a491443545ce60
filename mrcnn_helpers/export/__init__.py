"""Export artifacts: the static ONNX graph, TensorRT engines, INT8 calibration, DeepStream
configs, and the checks that the exported model computes what the PyTorch model computes.

    from mrcnn_helpers.export import export_onnx, verify_export
    from mrcnn_helpers.inference import OnnxRuntimeModel          # running what was exported
    meta = export_onnx(model, spec, "model.onnx", layout="deepstream")
    report = verify_export(model, OnnxRuntimeModel("model.onnx"), images)
"""

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
    "ExportableMaskRCNN", "ParityReport", "build_engine", "check_ap_drop", "compare_ap",
    "compare_detections", "export_onnx", "fold_input_scale", "format_ap_table",
    "make_entropy_calibrator", "read_config", "verify_export", "write_deepstream_configs",
]
