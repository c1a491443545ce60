"""What an exported model needs to be used on its own: layout, input contract, classes, spec.

Stored as JSON in the ONNX file's metadata_props (key METADATA_KEY) and, for TensorRT engines,
in a sidecar file `<engine>.json`, so evaluation, inference and deployment can feed an exported
model exactly as it was exported (image size, batch, normalization) and read its outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.fileio import atomic_write
from mrcnn_helpers.model.maskrcnn import PIXEL_MEAN

METADATA_KEY = "mrcnn_export"
FORMAT_VERSION = 1


class ExportError(MrcnnError):
    """An exported model (ONNX, engine, metadata) cannot be written, read or used as asked."""


@dataclass(frozen=True)
class ExportMetadata:
    """The contract of an exported graph.

    Input `input_name`: float32 [batch_size, 3, H, W] RGB, image_size = (H, W), the image as
    resize_and_pad makes it; 0..255 values when normalize_in_graph, else
    net_scale_factor * (pixel - offsets[c]) (DeepStream's nvinfer preprocessing).
    Outputs: see graph.ExportableMaskRCNN for each layout.
    """

    layout: str
    batch_size: int
    image_size: tuple[int, int]
    num_classes: int  # incl. background
    detections_per_image: int
    mask_resolution: int
    normalize_in_graph: bool
    net_scale_factor: float
    offsets: tuple[float, float, float]
    input_name: str
    output_names: tuple[str, ...]
    opset: int = 17
    class_names: tuple[str, ...] = ()  # index 0 = "background"
    category_ids: tuple[int, ...] = ()  # COCO id of label i at index i - 1
    spec_text: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ExportMetadata:
        try:
            data = json.loads(text)
            if int(data.get("format_version", 0)) > FORMAT_VERSION:
                raise ExportError(f"{source}: export metadata version {data['format_version']} is "
                                  f"newer than this toolkit reads ({FORMAT_VERSION})")
            data["image_size"] = tuple(int(v) for v in data["image_size"])
            data["offsets"] = tuple(float(v) for v in data["offsets"])
            for key in ("output_names", "class_names"):
                data[key] = tuple(data.get(key) or ())
            data["category_ids"] = tuple(int(v) for v in data.get("category_ids") or ())
            return cls(**data)
        except ExportError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ExportError(f"{source}: export metadata is unreadable ({exc}); re-export the "
                              "model with `mrcnn export`") from None


def normalize_input(images, meta: ExportMetadata):
    """uint8 (or 0..255 float) images [N, 3, H, W] -> the float32 numpy array the graph takes:
    unchanged values when the graph normalizes itself, else scale * (pixel - offsets[c])."""
    x = np.asarray(images, dtype=np.float32)
    if not meta.normalize_in_graph:
        offsets = np.asarray(meta.offsets, np.float32).reshape(1, 3, 1, 1)
        x = (x - offsets) * np.float32(meta.net_scale_factor)
    return np.ascontiguousarray(x)


def default_offsets() -> tuple[float, float, float]:
    return tuple(float(v) for v in PIXEL_MEAN)


def read_onnx_metadata(model_proto, source: str) -> ExportMetadata:
    """ExportMetadata stored in an onnx.ModelProto by export_onnx."""
    for prop in model_proto.metadata_props:
        if prop.key == METADATA_KEY:
            return ExportMetadata.from_json(prop.value, source)
    raise ExportError(f"{source}: not exported by `mrcnn export` (no '{METADATA_KEY}' metadata); "
                      "its input and output contract is unknown")


def sidecar_path(engine_path) -> Path:
    """Where a TensorRT engine's metadata lives: `<engine>.json` next to it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path, metadata: ExportMetadata) -> Path:
    return atomic_write(sidecar_path(engine_path), metadata.to_json() + "\n", error=ExportError,
                        what="engine metadata")


def read_sidecar(engine_path) -> ExportMetadata:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError(f"{engine_path}: its metadata file {path} is missing; engines built by "
                          "`mrcnn export --engine` have one next to them")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    return ExportMetadata.from_json(text, str(path))
