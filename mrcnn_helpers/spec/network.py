"""The network a spec describes: the fields that define its weights, and its class names.

A checkpoint records `network_fields(spec)`; resuming, loading for inference and exporting
compare it with the spec at hand through `network_differences`, so a spec that would build
another network (other layers or shapes, other trainable set, other anchors or box coding) is
refused with the list of fields that differ. Schedule, data and inference settings are not part
of it: they may change between runs (e.g. raising total_steps to train longer).

Class names everywhere are the contiguous labels' names with index 0 = "background"
(`class_names_with_background`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mrcnn_helpers.errors import SpecError

NETWORK_FIELDS = (
    "data_config.num_classes",
    "maskrcnn_config.arch",
    "maskrcnn_config.nlayers",
    "maskrcnn_config.freeze_bn",
    "maskrcnn_config.freeze_blocks",
    "maskrcnn_config.include_mask",
    "maskrcnn_config.fast_rcnn_mlp_head_dim",
    "maskrcnn_config.mrcnn_resolution",
    "maskrcnn_config.min_level",
    "maskrcnn_config.max_level",
    "maskrcnn_config.num_scales",
    "maskrcnn_config.aspect_ratios",
    "maskrcnn_config.anchor_scale",
    "maskrcnn_config.bbox_reg_weights",
)
BACKGROUND = "background"
_MISSING = object()


def _plain(value: Any) -> Any:
    # Tuples become lists so stored values compare equal after a torch.save / JSON round trip.
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def network_fields(spec: Any) -> dict[str, Any]:
    """{dotted field name: plain value} of the NETWORK_FIELDS the spec object has."""
    fields = {}
    for dotted in NETWORK_FIELDS:
        value: Any = spec
        for part in dotted.split("."):
            value = getattr(value, part, _MISSING)
            if value is _MISSING:
                break
        if value is not _MISSING:
            fields[dotted] = _plain(value)
    return fields


def network_fields_of_model(cfg: Any, num_classes: int) -> dict[str, Any]:
    """network_fields of a built model, from its maskrcnn_config and class count."""
    holder = type("_Spec", (), {})()
    holder.maskrcnn_config = cfg
    holder.data_config = type("_Data", (), {"num_classes": int(num_classes)})()
    return network_fields(holder)


def network_differences(saved: dict | None, current: dict, *, saved_name: str = "checkpoint",
                        current_name: str = "spec") -> list[str]:
    """'field: checkpoint X, spec Y' for every network field recorded on both sides that differs.

    A field the saved side does not record (None: nothing recorded; a file from an older version
    without that field) is not compared.
    """
    if not saved:
        return []
    return [f"{name}: {saved_name} {saved[name]!r}, {current_name} {current.get(name)!r}"
            for name in NETWORK_FIELDS
            if name in saved and name in current and _plain(saved[name]) != current[name]]


def class_names_with_background(names: Iterable[str] | None, num_classes: int, *,
                                source: str = "class names") -> list[str]:
    """The names of labels 0..num_classes-1, index 0 = "background".

    names: all num_classes names, the num_classes - 1 foreground names (background is
    prepended), or None / empty (generic "class_<i>" names). Raises SpecError naming `source`
    when the count fits neither.
    """
    num_classes = int(num_classes)
    names = [str(n) for n in (names or [])]
    if not names:
        return [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)]
    if len(names) == num_classes - 1:
        return [BACKGROUND] + names
    if len(names) != num_classes:
        raise SpecError(f"{source}: {len(names)} names, but the model has {num_classes - 1} "
                        f"classes (give {num_classes - 1} names, one per class, or "
                        f"{num_classes} with background first)")
    return names
