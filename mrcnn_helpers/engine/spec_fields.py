"""What a checkpoint records about the spec and the dataset, and the check made when resuming."""

from __future__ import annotations

from typing import Any

from mrcnn_helpers.errors import CheckpointError

# Spec fields that define the network (its layers, their shapes, what is trainable, the anchors
# the RPN learned). Resuming with any of them changed would load weights into a different model
# or optimizer state into a different parameter list, so it is refused. Schedule, data and
# evaluation fields may change between runs (e.g. raising total_steps to train longer).
MODEL_FIELDS = (
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
)
_MISSING = object()


def _plain(value: Any) -> Any:
    # Tuples become lists so the stored values compare equal after a torch.save/torch.load trip.
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def model_fields(spec: Any) -> dict[str, Any]:
    """{dotted field name: plain value} of the MODEL_FIELDS the spec object has."""
    fields = {}
    for dotted in MODEL_FIELDS:
        value: Any = spec
        for part in dotted.split("."):
            value = getattr(value, part, _MISSING)
            if value is _MISSING:
                break
        if value is not _MISSING:
            fields[dotted] = _plain(value)
    return fields


def check_model_fields(current: dict, saved: dict | None, source: Any) -> None:
    """Raise CheckpointError listing the network-defining fields whose values differ.

    `saved` is the checkpoint's "model_fields"; None (not recorded) passes.
    """
    if saved is None:
        return
    differ = [
        f"  {name}: checkpoint {saved.get(name)!r}, spec {current.get(name)!r}"
        for name in sorted(set(current) | set(saved))
        if saved.get(name) != current.get(name)
    ]
    if differ:
        raise CheckpointError(
            f"cannot resume from {source}: the spec builds a different network than the one "
            "the checkpoint was trained with:\n" + "\n".join(differ)
            + "\nUse a new results directory for the changed spec, or restore these fields."
        )


def spec_text(spec: Any) -> str:
    """The spec in TLT text format (what checkpoints and RESULTS_DIR/spec.txt store)."""
    from mrcnn_helpers.spec import format_spec

    return format_spec(spec)


def class_names_of(train_loader: Any, spec: Any) -> tuple[list[str], list[int]]:
    """(class_names, category_ids) of the training set, for inference from a checkpoint.

    Read from the loader's dataset (`class_names`: index 0 = "background"; `category_ids`: COCO
    id of contiguous label i at index i-1). A dataset without them (e.g. a user's own loader)
    gets generic names "class_<i>" and ids 1..num_classes-1, so a checkpoint can always be used.
    """
    dataset = getattr(train_loader, "dataset", None)
    names = getattr(dataset, "class_names", None)
    ids = getattr(dataset, "category_ids", None)
    num_classes = int(spec.data_config.num_classes)
    if names is None:
        names = ["background"] + [f"class_{i}" for i in range(1, num_classes)]
    if ids is None:
        ids = list(range(1, len(names)))
    return [str(n) for n in names], [int(i) for i in ids]
