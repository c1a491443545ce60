"""Loading pretrained weights for transfer learning, offline.

`checkpoint` in the spec may be:
  - ""                                   random initialization;
  - "torchvision://maskrcnn_resnet50_fpn_coco"
                                         torchvision's COCO Mask R-CNN (R50-FPN);
  - "torchvision://resnet{18,34,50,101}_imagenet"
                                         torchvision's ImageNet ResNet, backbone body only;
  - a path to a .pth file                one of our training checkpoints, or a plain state dict in
                                         torchvision's MaskRCNN naming.
torchvision:// weights are read from the torch hub cache ($TORCH_HOME/hub/checkpoints/<official file
name>) and never downloaded. Tensors whose shapes differ from the model's (the class-specific
heads when num_classes differs) are skipped and stay freshly initialized. Files are read with
torch.load(weights_only=True): a checkpoint cannot run code.
"""

import os
import re
import warnings
from dataclasses import dataclass, field

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from ..errors import CheckpointError
from ..fileio import check_torch_file

SCHEME = "torchvision://"
_IMAGENET = {18: "ResNet18_Weights", 34: "ResNet34_Weights", 50: "ResNet50_Weights",
             101: "ResNet101_Weights"}


@dataclass
class LoadReport:
    """What `load_pretrained` did: counts and names, for the log."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)  # in the file, shape differs
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the file

    def summary(self) -> str:
        text = (f"Loaded {len(self.loaded)} tensors from {self.source}; "
                f"{len(self.missing)} left initialized")
        if self.skipped_shape:
            text += f"; skipped {len(self.skipped_shape)} with other shapes ({', '.join(self.skipped_shape[:4])}"
            text += ", ...)" if len(self.skipped_shape) > 4 else ")"
        return text


def torchvision_weights_file(name: str) -> str:
    """Path in the torch hub cache where torchvision keeps the weights called `name`."""
    if name == "maskrcnn_resnet50_fpn_coco":
        url = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url
    else:
        match = re.fullmatch(r"resnet(\d+)_imagenet", name)
        if not match or int(match.group(1)) not in _IMAGENET:
            valid = ["maskrcnn_resnet50_fpn_coco"] + [f"resnet{n}_imagenet" for n in _IMAGENET]
            raise CheckpointError(f"unknown pretrained weights '{SCHEME}{name}'; valid: "
                                  + ", ".join(SCHEME + v for v in valid))
        url = getattr(tvm, _IMAGENET[int(match.group(1))]).IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def read_state_dict(path: str) -> dict:
    """Tensors of a weights file (our checkpoint or a plain state dict), read weights-only."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    check_torch_file(path, path, error=CheckpointError)  # a zip bomb is refused before torch.load
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        if "Weights only load failed" in str(exc):  # torch's explanation spans many lines
            raise CheckpointError(f"{path} refused: it holds pickled objects other than tensors, "
                                  "which would run code when loaded (files are loaded "
                                  "weights-only); re-save its tensors as a plain state dict"
                                  ) from None
        raise CheckpointError(f"cannot load {path}: not a readable plain-weights file "
                              f"(files are loaded weights-only and never run code): {exc}") from None
    if isinstance(obj, dict) and obj.get("format") == "mrcnn-checkpoint":
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return dict(obj)


def _rename_legacy(state: dict) -> dict:
    """Map torchvision's pre-0.13 key names (as in its COCO file) to the current ones."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        key = re.sub(r"^(roi_heads\.mask_head)\.mask_fcn(\d)\.(weight|bias)$",
                     lambda m: f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}", key)
        out[key] = value
    return out


def load_state_into(model: nn.Module, state: dict, source: str) -> LoadReport:
    """Copy every tensor of `state` whose name and shape match into `model`."""
    own = model.state_dict()
    report = LoadReport(source)
    usable = {}
    for key, value in _rename_legacy(state).items():
        if key.endswith("num_batches_tracked") and key not in own:
            continue  # BatchNorm bookkeeping; FrozenBatchNorm2d has none
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.skipped_shape.append(key)
        else:
            usable[key] = value
            report.loaded.append(key)
    model.load_state_dict(usable, strict=False)
    report.missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if not report.loaded:
        raise CheckpointError(f"{source}: no tensor matches the model by name and shape; is it a "
                              "Mask R-CNN / ResNet state dict in torchvision's naming?")
    return report


def load_pretrained(model: nn.Module, checkpoint: str) -> LoadReport | None:
    """Initialize `model` from the spec's `checkpoint` string (see the module docstring)."""
    if not checkpoint:
        return None
    if checkpoint.startswith(SCHEME):
        name = checkpoint[len(SCHEME):]
        path = torchvision_weights_file(name)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"pretrained weights '{checkpoint}' are not available offline: expected {path}. "
                "Copy torchvision's file there (or set TORCH_HOME), or set checkpoint to a local "
                ".pth path, or to \"\" to train from scratch (then set freeze_bn: false).")
        state = read_state_dict(path)
        if name.endswith("_imagenet"):
            state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    else:
        state = read_state_dict(checkpoint)
    report = load_state_into(model, state, checkpoint)
    if report.unexpected and not checkpoint.startswith(SCHEME):
        warnings.warn(f"{checkpoint}: {len(report.unexpected)} tensors have no place in the model "
                      f"(e.g. {report.unexpected[0]})", stacklevel=2)
    return report
