"""Protobuf schema of TLT's Mask R-CNN spec, built in code (no protoc, no .proto file).

The message types mirror TLT's `Experiment`, `DataConfig` and `MaskRCNNConfig` and are generated
from the dataclasses in config.py, plus the TLT/TAO fields this toolkit accepts but ignores
(IGNORED_FIELDS). google.protobuf.text_format parses spec files against it, so syntax, field names
and scalar types are checked exactly as TLT checked them. Differences from TLT's .proto, on purpose:

- proto2 optional fields, so the loader knows which fields a file set (the rest take the
  dataclass defaults, which are TLT's);
- `double` instead of TLT's `float`: 0.00002 reads back as 0.00002, not 1.9999999494757503e-05;
- `anchor_scale` is a double (TLT: uint32), a superset that accepts every TLT value;
- the list-valued fields stay strings, exactly TLT's syntax ("(832, 1344)"); loader.py parses them.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .config import DataConfig, ExperimentSpec, MaskRCNNConfig

_F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "mrcnn_spec"

# Block name as written in spec files ("" = top level) -> dataclass.
BLOCKS: dict[str, type] = {"": ExperimentSpec, "data_config": DataConfig,
                           "maskrcnn_config": MaskRCNNConfig}
_MESSAGE_NAMES = {"": "Experiment", "data_config": "DataConfig",
                  "maskrcnn_config": "MaskRCNNConfig"}

# Fields holding paths or path patterns: "$VAR" / "${VAR}" in them are replaced from the
# environment when the spec is loaded ("$$" is a literal "$"). Relative paths stay relative to the
# current working directory of the process, not to the spec file.
PATH_FIELDS = frozenset({
    "checkpoint",
    "data_config.training_file_pattern", "data_config.validation_file_pattern",
    "data_config.val_json_file", "data_config.train_json_file",
    "data_config.train_image_dir", "data_config.val_image_dir",
})

# Fields TLT does not have (documented in config.py as "ours").
OUR_FIELDS = frozenset({
    "num_checkpoints_to_keep",
    "data_config.train_json_file", "data_config.train_image_dir", "data_config.val_image_dir",
    "data_config.aug_scale_min", "data_config.aug_scale_max",
    "maskrcnn_config.test_score_thresh",
})


@dataclasses.dataclass(frozen=True)
class IgnoredField:
    """A TLT/TAO field accepted so existing specs load, with no effect here (and why)."""

    block: str
    name: str
    kind: str        # "bool" | "int" | "float" | "str"
    default: Any     # a value other than this draws a SpecWarning
    reason: str


IGNORED_FIELDS = (
    IgnoredField("", "l1_weight_decay", "float", 0.0,
                 "no L1 penalty is applied; only l2_weight_decay is used"),
    IgnoredField("", "num_epochs", "int", 0, "training length is total_steps"),
    IgnoredField("", "num_examples_per_epoch", "int", 0, "training length is total_steps"),
    IgnoredField("", "skip_checkpoint_variables", "str", "",
                 "pretrained tensors whose shapes differ from the model's are skipped "
                 "automatically"),
    IgnoredField("", "pruned_model_path", "str", "", "pruned models are not supported"),
    IgnoredField("", "use_xla", "bool", False, "XLA is TensorFlow-only"),
    IgnoredField("", "use_batched_nms", "bool", False, "the NMS implementation is fixed"),
    IgnoredField("", "loss_scale", "float", 0.0,
                 "use_amp picks bf16, or fp16 with dynamic loss scaling"),
    IgnoredField("", "save_checkpoints_steps", "int", 0,
                 "checkpoints are written every num_steps_per_eval steps"),
    IgnoredField("", "global_gradient_clip_ratio", "float", 0.0, "gradients are not clipped"),
    IgnoredField("", "visualize_images_summary", "bool", False,
                 "no image summaries are written to TensorBoard"),
    IgnoredField("", "report_frequency", "int", 0, "logging_frequency sets the log interval"),
    IgnoredField("data_config", "prefetch_buffer_size", "int", 0,
                 "tf.data-specific; each DataLoader worker prefetches on its own"),
    IgnoredField("data_config", "shuffle_buffer_size", "int", 0,
                 "tf.data-specific; the whole training set is reshuffled every pass"),
)

_PROTO_TYPES = {"bool": _F.TYPE_BOOL, "int": _F.TYPE_UINT32, "float": _F.TYPE_DOUBLE,
                "str": _F.TYPE_STRING}


def dotted(block: str, name: str) -> str:
    """'maskrcnn_config.nlayers', or just 'total_steps' for a top-level field."""
    return f"{block}.{name}" if block else name


def block_label(block: str) -> str:
    """How messages name a block."""
    return block if block else "the top level"


@functools.cache
def field_types(block: str) -> dict[str, Any]:
    """{field name: resolved type hint} of a block's spec fields (dataclass order, no `source`)."""
    cls = BLOCKS[block]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "source"}


def scalar_kind(hint: Any) -> str:
    """'bool' | 'int' | 'float' | 'str' | 'literal' (a tuple written as a string) | 'block'."""
    if hint in (bool, int, float, str):
        return hint.__name__
    if typing.get_origin(hint) is tuple:
        return "literal"
    return "block"


@functools.cache
def known_fields(block: str) -> tuple[str, ...]:
    """Every field name a block accepts: spec fields, nested blocks and ignored TLT fields."""
    names = list(field_types(block))
    names += [f.name for f in IGNORED_FIELDS if f.block == block]
    return tuple(names)


def ignored_field(block: str, name: str) -> IgnoredField | None:
    for f in IGNORED_FIELDS:
        if f.block == block and f.name == name:
            return f
    return None


def block_of_message(full_name: str) -> str | None:
    """Block name of a message type name such as 'mrcnn_spec.DataConfig'."""
    for block, name in _MESSAGE_NAMES.items():
        if full_name in (name, f"{PACKAGE}.{name}"):
            return block
    return None


def _add_message(file_proto: descriptor_pb2.FileDescriptorProto, block: str) -> None:
    message = file_proto.message_type.add(name=_MESSAGE_NAMES[block])
    number = 0
    for name, hint in field_types(block).items():
        number += 1
        kind = scalar_kind(hint)
        if kind == "block":
            message.field.add(name=name, number=number, label=_F.LABEL_OPTIONAL,
                              type=_F.TYPE_MESSAGE,
                              type_name=f".{PACKAGE}.{_MESSAGE_NAMES[name]}")
        else:
            proto_type = _F.TYPE_STRING if kind == "literal" else _PROTO_TYPES[kind]
            message.field.add(name=name, number=number, label=_F.LABEL_OPTIONAL, type=proto_type)
    for ignored in IGNORED_FIELDS:
        if ignored.block == block:
            number += 1
            message.field.add(name=ignored.name, number=number, label=_F.LABEL_OPTIONAL,
                              type=_PROTO_TYPES[ignored.kind])


@functools.cache
def experiment_message_class() -> type:
    """The generated protobuf message class of the top-level `Experiment`."""
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="mrcnn_helpers/spec/maskrcnn_spec.proto", package=PACKAGE, syntax="proto2")
    for block in ("data_config", "maskrcnn_config", ""):
        _add_message(file_proto, block)
    pool = descriptor_pool.DescriptorPool()  # private pool: never clashes with other protos
    pool.Add(file_proto)
    descriptor = pool.FindMessageTypeByName(f"{PACKAGE}.{_MESSAGE_NAMES['']}")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)
