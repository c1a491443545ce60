"""Export artifacts: the static ONNX graph and its FP16 and INT8 (Q/DQ) variants, TensorRT
engines, DeepStream configs, and the checks that the exported model computes what the PyTorch
model computes (parity, the accuracy table of every precision).

    from mrcnn_helpers.export import export_onnx, verify_export
    from mrcnn_helpers.inference import OnnxRuntimeModel          # running what was exported
    meta = export_onnx(model, spec, "model.onnx", layout="deepstream")
    report = verify_export(model, OnnxRuntimeModel("model.onnx"), images)
    convert_to_fp16("model.onnx", "model.fp16.onnx")
    quantize_int8("model.onnx", "model.int8.onnx", CalibrationBatches(DIR, meta, batch_size=1,
                                                                      batches=100))
    build_engine("model.int8.onnx", "model.int8.plan")   # TensorRT 10 / 11, strongly typed
"""

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
    "ExportableMaskRCNN", "ParityReport", "QuantizeReport", "build_engine", "check_ap_drop",
    "compare_ap", "compare_detections", "convert_to_fp16", "export_onnx", "fold_input_scale",
    "format_ap_table", "graph_precision", "quantize_int8", "read_config", "read_export_metadata",
    "verify_export", "write_deepstream_configs",
]
