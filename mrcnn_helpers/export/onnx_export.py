"""Export a trained Mask R-CNN to ONNX: static shapes, standard ops, DeepStream or compact layout.

    meta = export_onnx(model, spec, "model.onnx", batch_size=1, layout="deepstream")

The graph is `graph.ExportableMaskRCNN` traced by PyTorch's TorchScript-based exporter
(dynamo=False): the dynamo exporter cannot export NMS with data-dependent output sizes, while the
TorchScript exporter turns it into ONNX NonMaxSuppression. The written file carries an
ExportMetadata (input contract, layout, classes, the spec) in its metadata_props.
"""

from __future__ import annotations

import io
import warnings

import torch

from mrcnn_helpers.crypto import write_encrypted
from mrcnn_helpers.fileio import atomic_write
from mrcnn_helpers.inference.metadata import (
    METADATA_KEY,
    ExportError,
    ExportMetadata,
    default_offsets,
)
from mrcnn_helpers.spec import format_spec

from .graph import INPUT_NAME, NET_SCALE_FACTOR, ExportableMaskRCNN, output_names

# ONNX domains of standard operators: anything else would need a plugin at deployment.
STANDARD_DOMAINS = ("", "ai.onnx")
# TensorRT's TopK accepts k <= 3840.
TENSORRT_MAX_TOPK = 3840


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' package: pip install onnx "
                          "(and onnxruntime to verify the exported model)") from None
    return onnx


def check_standard_ops(model_proto) -> None:
    """Raise ExportError if the graph uses an operator outside the standard ONNX domain."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model_proto.graph.node
                     if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ExportError(f"the exported graph uses non-standard operators {custom}; deployment "
                          "would need plugins for them")


def _spec_text(spec) -> str:
    try:
        return format_spec(spec)
    except Exception:  # noqa: BLE001 - a duck-typed spec (tests, notebooks) has no text form
        return ""


def build_metadata(spec, *, batch_size: int, layout: str, normalize_in_graph: bool, opset: int,
                   class_names=None, category_ids=None) -> ExportMetadata:
    cfg, data = spec.maskrcnn_config, spec.data_config
    num_classes = int(data.num_classes)
    names = list(class_names or [])
    if names and len(names) == num_classes - 1:
        names = ["background"] + names
    if names and len(names) != num_classes:
        raise ExportError(f"{len(names)} class names given, but data_config.num_classes is "
                          f"{num_classes} (names incl. background)")
    return ExportMetadata(
        layout=layout, batch_size=int(batch_size),
        image_size=(int(data.image_size[0]), int(data.image_size[1])),
        num_classes=num_classes, detections_per_image=int(cfg.test_detections_per_image),
        mask_resolution=int(cfg.mrcnn_resolution), normalize_in_graph=bool(normalize_in_graph),
        net_scale_factor=float(NET_SCALE_FACTOR), offsets=default_offsets(),
        input_name=INPUT_NAME, output_names=output_names(layout), opset=int(opset),
        class_names=tuple(names), category_ids=tuple(int(c) for c in category_ids or ()),
        spec_text=_spec_text(spec))


def _check_tensorrt_limits(spec) -> None:
    cfg = spec.maskrcnn_config
    big = {name: getattr(cfg, name) for name in ("test_rpn_pre_nms_topn", "test_rpn_post_nms_topn",
                                                  "test_detections_per_image")
           if getattr(cfg, name) > TENSORRT_MAX_TOPK}
    if big:
        warnings.warn(f"{big}: TensorRT's TopK takes k <= {TENSORRT_MAX_TOPK}; the ONNX model "
                      "runs in ONNX Runtime but a TensorRT engine build will fail", stacklevel=3)


def export_onnx(model: torch.nn.Module, spec, path, *, batch_size: int = 1,
                layout: str = "deepstream", normalize_in_graph: bool = True, opset: int = 17,
                class_names=None, category_ids=None, key: str | None = None) -> ExportMetadata:
    """Write `model` (a trained MaskRCNN) as an ONNX graph at `path`; returns its ExportMetadata.

    Input "Input": float32 [batch_size, 3, H, W] with (H, W) = spec.data_config.image_size; raw
    0..255 RGB when normalize_in_graph, else NET_SCALE_FACTOR * (pixel - mean) as DeepStream feeds
    it (the per-channel std is folded into conv1). Outputs are padded to
    test_detections_per_image rows; see graph.ExportableMaskRCNN for both layouts. The
    inference settings of the spec (thresholds, top-n) are baked into the graph.
    class_names / category_ids are stored in the metadata for evaluation and labels files.
    key: encrypt the written file (crypto.py); ONNX Runtime backends then need the key, and
    DeepStream / TensorRT tools cannot read it.
    """
    onnx = _require_onnx()
    if int(batch_size) < 1:
        raise ExportError(f"batch size must be >= 1, got {batch_size}")
    if int(opset) < 16:
        raise ExportError(f"opset {opset} is too old: RoiAlign's coordinate mode needs opset >= "
                          "16 (17 recommended)")
    output_names(layout)  # validates
    _check_tensorrt_limits(spec)
    meta = build_metadata(spec, batch_size=batch_size, layout=layout,
                          normalize_in_graph=normalize_in_graph, opset=opset,
                          class_names=class_names, category_ids=category_ids)
    if int(model.num_classes) != meta.num_classes:
        raise ExportError(f"the model has {model.num_classes} classes but the spec's "
                          f"data_config.num_classes is {meta.num_classes}")
    try:
        wrapper = ExportableMaskRCNN(model, meta.image_size, cfg=spec.maskrcnn_config,
                                     batch_size=meta.batch_size, layout=layout,
                                     normalize_in_graph=normalize_in_graph).eval()
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    dummy = torch.zeros((meta.batch_size, 3, *meta.image_size))
    buffer = io.BytesIO()  # traced in memory: nothing is written until the graph is checked
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings flag Python ints taken from shapes: here they are meant to be
        # constants (the graph is static by design).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(wrapper, (dummy,), buffer, input_names=[INPUT_NAME],
                          output_names=list(meta.output_names), opset_version=int(opset),
                          dynamo=False, do_constant_folding=True)
    proto = onnx.load_model_from_string(buffer.getvalue())
    check_standard_ops(proto)
    onnx.helper.set_model_props(proto, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if key:
        write_encrypted(path, data, key)
    else:
        atomic_write(path, data, error=ExportError, what="ONNX model")
    return meta
