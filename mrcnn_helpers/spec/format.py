"""Writing a spec back out: TLT text format (round-trippable) and a table for notebooks."""

from __future__ import annotations

from typing import Any

from .config import ExperimentSpec
from .schema import BLOCKS, PATH_FIELDS, dotted, field_types, scalar_kind
from .values import escape_env, format_literal, format_value, quote

_BLOCK_COMMENTS = {
    "": "Experiment: schedule, optimizer, checkpoints.",
    "data_config": "Data: input size, dataset files, augmentation.",
    "maskrcnn_config": "Model: backbone, RPN, RoI sampling, heads, anchors, loss weights.",
}
_INDENT = "  "


def _value_text(block: str, name: str, value: Any) -> str:
    hint = field_types(block)[name]
    kind = scalar_kind(hint)
    if kind == "literal":
        return quote(format_literal(value, hint))
    if kind == "str":
        # "$" is doubled so a resolved path is not expanded a second time when read back.
        return quote(escape_env(value) if dotted(block, name) in PATH_FIELDS else value)
    return format_value(value)


def _block_lines(obj: Any, block: str, indent: str) -> list[str]:
    return [f"{indent}{name}: {_value_text(block, name, getattr(obj, name))}"
            for name, hint in field_types(block).items() if scalar_kind(hint) != "block"]


def format_spec(spec: ExperimentSpec) -> str:
    """The fully resolved spec (every field, defaults included) in TLT's text format.

    parse_spec(format_spec(spec)) == spec (ExperimentSpec equality ignores `source`). Only the
    fields this toolkit uses are written; TLT fields it ignores are left out. Environment
    variables are already expanded; "$" in paths is written as "$$".
    """
    source = spec.source.replace("\n", " ")
    lines = ["# Mask R-CNN experiment spec (TLT text format), fully resolved: every field is",
             f"# listed, defaults included. Resolved from: {source}", "",
             f"# {_BLOCK_COMMENTS['']}"]
    lines += _block_lines(spec, "", "")
    for block in ("data_config", "maskrcnn_config"):
        lines += ["", f"# {_BLOCK_COMMENTS[block]}", f"{block} {{"]
        lines += _block_lines(getattr(spec, block), block, _INDENT)
        lines.append("}")
    return "\n".join(lines) + "\n"


def spec_table(spec: ExperimentSpec) -> list[tuple[str, str, Any, bool]]:
    """Rows (block, field, value, is_default) of every field, in spec-file order.

    block is "experiment" for top-level fields, else "data_config" / "maskrcnn_config"; value is
    the parsed Python value (tuples for list-valued fields); is_default compares with the
    toolkit's default (TLT's). E.g. pandas.DataFrame(spec_table(spec), columns=[...]).
    """
    rows = []
    for block in ("", "data_config", "maskrcnn_config"):
        obj = getattr(spec, block) if block else spec
        default = BLOCKS[block]()
        for name, hint in field_types(block).items():
            if scalar_kind(hint) == "block":
                continue
            value = getattr(obj, name)
            rows.append((block or "experiment", name, value, value == getattr(default, name)))
    return rows
