"""Inference: any model file behind one `Predictor`, postprocessing, COCO results, `mrcnn infer`.

    from mrcnn_helpers.inference import load_predictor
    predictor = load_predictor("results/run1")          # checkpoint, weights, .onnx or .plan
    detections = predictor.predict(["a.jpg", "b.png"])  # original pixels, labels, masks

Evaluation (mrcnn_helpers.evaluate), export verification, deployment and the notebooks all run
models through `Predictor.forward` and map detections back with `postprocess_detections`.
"""

from .annotate import annotate_images
from .backends import ExportedModel, OnnxRuntimeModel, decode_outputs
from .coco_results import detections_to_coco_results
from .loading import LoadedModel, is_exported, load_model_file, load_predictor
from .metadata import ExportError, ExportMetadata
from .postprocess import MASK_THRESHOLD, postprocess_detections
from .predictor import Predictor, as_predictor, to_image_tensor
from .tensorrt import TensorRTModel, TensorRTUnavailable

__all__ = [
    "MASK_THRESHOLD", "ExportError", "ExportMetadata", "ExportedModel", "LoadedModel",
    "OnnxRuntimeModel", "Predictor", "TensorRTModel", "TensorRTUnavailable", "annotate_images",
    "as_predictor", "decode_outputs", "detections_to_coco_results", "is_exported",
    "load_model_file", "load_predictor", "postprocess_detections", "to_image_tensor",
]
