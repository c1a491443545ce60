"""Load any model file: checkpoints, weights files, torchvision state dicts, ONNX, TensorRT.

    loaded = load_model_file("results/run1")            # newest checkpoint of a results dir
    predictor = load_predictor("model.onnx")             # ready to run (see predictor.Predictor)
    model, spec, class_names, category_ids = loaded      # a LoadedModel unpacks like a tuple

What a path may be:
- a results directory: its newest checkpoint (`model.step-<N>.pth`);
- one of our training checkpoints or weights files (format "mrcnn-checkpoint" / "mrcnn-weights":
  the network is rebuilt from the spec stored in it, or from `spec` when given, e.g. to evaluate
  with other test-time settings);
- a plain state dict in torchvision's MaskRCNN naming (then `spec` is required: it says which
  network the tensors belong to);
- an exported `.onnx` (ONNX Runtime) or a TensorRT engine `.plan` / `.engine` / `.trt` (its
  `.json` metadata beside it); with a spec, its image_size and num_classes must match the graph;
- any of these encrypted with `--key` (the key is then required).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrcnn_helpers.crypto import is_encrypted, read_maybe_encrypted
from mrcnn_helpers.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    WEIGHTS_FORMAT,
    checked_state,
    latest_checkpoint,
    read_torch_file,
)
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.model.maskrcnn import build_model, place_model
from mrcnn_helpers.model.weights import load_state_into
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import parse_spec
from mrcnn_helpers.spec.network import (
    class_names_with_background,
    network_differences,
    network_fields,
)

from .backends import OnnxRuntimeModel
from .metadata import ExportError, ExportMetadata
from .predictor import Predictor
from .tensorrt import TensorRTModel

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass
class LoadedModel:
    """A model read from a file, with the spec and class list it belongs to.

    model: an eval-mode MaskRCNN on `device` (PyTorch files) or an exported backend; kind:
    "checkpoint", "state_dict", "onnx" or "tensorrt"; source: the file read.
    Unpacks as (model, spec, class_names, category_ids).
    """

    model: Any
    spec: Any
    class_names: list[str]
    category_ids: list[int]
    source: Path
    kind: str

    def __iter__(self):
        return iter((self.model, self.spec, self.class_names, self.category_ids))

    def predictor(self, *, device=None, precision: str | None = None) -> Predictor:
        return Predictor(self.model, self.spec, self.class_names, category_ids=self.category_ids,
                         device=device, precision=precision, source=str(self.source))


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` names an exported model (ONNX or TensorRT engine) by its suffix."""
    return Path(path).suffix.lower() in ONNX_SUFFIXES + ENGINE_SUFFIXES


def load_model_file(path: str | os.PathLike, spec=None, device=None,
                    key: str | None = None) -> LoadedModel:
    """Read any model file (see the module docstring). device: where a PyTorch model goes
    (default CUDA when available); key: passphrase of an encrypted file."""
    path = Path(path)
    if is_exported(path):
        return _load_exported(path, spec, device, key)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint (model.step-N.pth) in this directory")
        path = found
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    device = resolve_device(device)
    if is_encrypted(path):
        # Decrypted in memory: the plaintext never touches the disk.
        return _load_pytorch(path, spec, device, data=read_maybe_encrypted(path, key))
    return _load_pytorch(path, spec, device)


def load_predictor(path: str | os.PathLike, spec=None, *, device=None, key: str | None = None,
                   precision: str | None = None) -> Predictor:
    """load_model_file(...) as a ready-to-run Predictor (precision: see Predictor)."""
    return load_model_file(path, spec=spec, device=device, key=key).predictor(precision=precision)


def _load_pytorch(path: Path, spec, device: torch.device, data: bytes | None = None
                  ) -> LoadedModel:
    """The network of a checkpoint, weights file or plain state dict at `path` (its decrypted
    bytes when `data` is given), read once (read_torch_file: bounded, weights only)."""
    obj = read_torch_file(path if data is None else data, str(path), map_location="cpu")
    if not (isinstance(obj, dict) and obj.get("format") in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT)):
        return _load_state_dict(path, obj, spec, device)
    state = checked_state(obj, str(path))
    if spec is None:
        text = state.get("spec_text")
        if not text:
            raise CheckpointError(f"checkpoint {path} stores no spec: pass the spec (-e SPEC)")
        spec = parse_spec(text, source=f"{path} (stored spec)")
    model = build_model(spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        differ = network_differences(state.get("model_fields"), network_fields(spec))
        # The differing fields say what is wrong; torch's per-tensor list (a dozen lines) is
        # shown only when they cannot.
        detail = ("; network fields that differ: " + "; ".join(differ)) if differ else f"\n{exc}"
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the spec{detail}") from None
    place_model(model, device).eval()
    num_classes = int(spec.data_config.num_classes)
    names = class_names_with_background(state.get("class_names"), num_classes,
                                        source=f"{path} class_names")
    ids = list(state.get("category_ids") or range(1, num_classes))
    return LoadedModel(model, spec, names, ids, path, "checkpoint")


def _tensors_of(obj, path: Path) -> dict:
    """The state dict in a plain weights file's object: the object itself, or its "model" /
    "state_dict" entry (how torchvision and most training scripts save), all tensors."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return dict(obj)


def _load_state_dict(path: Path, obj, spec, device: torch.device) -> LoadedModel:
    """A plain state dict in torchvision's naming: every tensor of the network must be there."""
    if spec is None:
        raise CheckpointError(f"{path} is not a training checkpoint of this toolkit but a plain "
                              "state dict: pass the spec of its network (-e SPEC) to load it")
    model = build_model(spec)
    report = load_state_into(model, _tensors_of(obj, path), str(path))
    if report.missing or report.skipped_shape:
        problems = report.missing[:3] + report.skipped_shape[:3]
        raise CheckpointError(
            f"{path} does not hold the whole network the spec builds: {len(report.missing)} "
            f"tensors missing, {len(report.skipped_shape)} of other shapes (e.g. "
            f"{', '.join(problems)}); check data_config.num_classes and the backbone fields")
    place_model(model, device).eval()
    num_classes = int(spec.data_config.num_classes)
    return LoadedModel(model, spec, class_names_with_background(None, num_classes),
                       list(range(1, num_classes)), path, "state_dict")


def _load_exported(path: Path, spec, device, key) -> LoadedModel:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        model, kind = OnnxRuntimeModel(path, key=key), "onnx"
    else:
        model, kind = TensorRTModel(path, device=device), "tensorrt"
    meta = model.meta
    spec = spec_for_export(meta, spec, str(path))
    names = class_names_with_background(meta.class_names, meta.num_classes,
                                        source=f"{path} class_names")
    ids = list(meta.category_ids) or list(range(1, meta.num_classes))
    return LoadedModel(model, spec, names, ids, path, kind)


def spec_for_export(meta: ExportMetadata, spec=None, source: str = ""):
    """The spec to evaluate with: the given one (checked against the graph) or the stored one."""
    if spec is None:
        if not meta.spec_text:
            raise ExportError(f"{source} stores no spec: pass the spec (-e SPEC)")
        spec = parse_spec(meta.spec_text, source=f"{source} (stored spec)")
        if int(spec.data_config.num_classes) != meta.num_classes:
            raise ExportError(f"{source}: its metadata says num_classes {meta.num_classes} but "
                              f"its stored spec says {spec.data_config.num_classes}: the file "
                              "was edited; re-export it")
        return spec
    image_size = tuple(int(v) for v in spec.data_config.image_size)
    num_classes = int(spec.data_config.num_classes)
    if image_size != tuple(meta.image_size) or num_classes != meta.num_classes:
        raise ExportError(
            f"{source} was exported for image_size {tuple(meta.image_size)} and num_classes "
            f"{meta.num_classes}, but the spec has {image_size} and "
            f"{spec.data_config.num_classes}; use the spec it was exported with, or re-export")
    return spec
