"""What a checkpoint records about the spec and the dataset, and the check made when resuming."""

from __future__ import annotations

from typing import Any

from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.spec.network import network_differences, network_fields

# The checkpoint key "model_fields" holds spec.network.network_fields(spec).
model_fields = network_fields


def check_model_fields(current: dict, saved: dict | None, source: Any) -> None:
    """Raise CheckpointError listing the network-defining fields whose values differ.

    `saved` is the checkpoint's "model_fields"; None (not recorded) passes.
    """
    differ = ["  " + line for line in network_differences(saved, current)]
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
