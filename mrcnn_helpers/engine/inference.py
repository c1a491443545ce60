"""Rebuild a trained model from a checkpoint, for evaluation, inference and export."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mrcnn_helpers.engine.checkpoint import load_checkpoint
from mrcnn_helpers.engine.spec_fields import model_fields
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.model.maskrcnn import place_model


def load_model_for_inference(
    path: str | os.PathLike,
    spec: Any = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any, list[str], list[int]]:
    """Load a training checkpoint into a freshly built model in eval mode.

    Returns (model, spec, class_names, category_ids). The network is built from `spec` when given
    (e.g. to evaluate with other test-time settings), otherwise from the spec text stored in the
    checkpoint. class_names[0] is "background"; category_ids[i-1] is the COCO id of label i.
    device: default CUDA when available, else CPU.

    Raises CheckpointError when the file is missing, corrupt, refused by weights_only, or does not
    fit the network the spec builds (the message lists the network fields that differ).
    """
    from mrcnn_helpers.model import build_model

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    state = load_checkpoint(path, map_location="cpu")
    if spec is None:
        from mrcnn_helpers.spec import parse_spec

        text = state.get("spec_text")
        if not text:
            raise CheckpointError(f"checkpoint {path} stores no spec: pass the spec explicitly")
        spec = parse_spec(text, source=f"{path} (stored spec)")
    model = build_model(spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        saved = state.get("model_fields") or {}
        current = model_fields(spec)
        differ = [f"{k}: checkpoint {saved.get(k)!r}, spec {current.get(k)!r}"
                  for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        # The differing fields say what is wrong; torch's per-tensor list (a dozen lines) is
        # shown only when they cannot.
        detail = ("; network fields that differ: " + "; ".join(differ)) if differ else f"\n{exc}"
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the spec{detail}"
        ) from None
    place_model(model, device).eval()
    num_classes = int(spec.data_config.num_classes)
    class_names = list(state.get("class_names") or
                       ["background"] + [f"class_{i}" for i in range(1, num_classes)])
    category_ids = list(state.get("category_ids") or range(1, len(class_names)))
    return model, spec, class_names, category_ids
