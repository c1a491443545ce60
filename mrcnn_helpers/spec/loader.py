"""The one place spec files are read: protobuf text format -> validated ExperimentSpec.

Strict: unknown fields, wrong types, duplicate fields and malformed list strings are errors that
point at file:line:column and say what would be valid. Paths in the spec stay as written (after
$VAR expansion): relative paths are relative to the current working directory of the process
that loads the spec, not to the spec file, as in TLT.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import warnings
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from mrcnn_helpers.errors import SpecError

from .config import ExperimentSpec
from .errors import SpecFieldError, SpecWarning, where
from .schema import (
    BLOCKS,
    IGNORED_FIELDS,
    PATH_FIELDS,
    block_label,
    block_of_message,
    dotted,
    experiment_message_class,
    field_types,
    ignored_field,
    known_fields,
    scalar_kind,
)
from .validate import validate_spec
from .values import describe, expand_env, format_literal, format_value, parse_literal, quote

_TOKEN = re.compile(r"""
    (?P<nl>\n) | (?P<ws>[^\S\n]+) | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
  | (?P<word>[A-Za-z0-9_.+\-]+) | (?P<punct>.)
""", re.VERBOSE)


@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    line: int
    column: int


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one field is written: its block, name, name position and first value token."""

    block: str
    name: str
    line: int
    column: int
    value: _Token | None


def _tokens(text: str) -> list[_Token]:
    tokens, line, line_start = [], 1, 0
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "nl":
            line, line_start = line + 1, match.end()
        elif kind not in ("ws", "comment"):
            tokens.append(_Token(kind, match.group(), line, match.start() - line_start + 1))
    return tokens


def _scan(text: str) -> list[_Entry]:
    """Field positions, found with a light tokenizer (text_format keeps none). Only positions
    come from here; text_format does the actual parsing and checking."""
    tokens, entries, stack = _tokens(text), [], [""]
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.kind == "punct" and tok.text in "}>" and len(stack) > 1:
            stack.pop()
        elif tok.kind == "word" and nxt is not None and nxt.text in (":", "{", "<"):
            value = tokens[i + 2] if nxt.text == ":" and i + 2 < len(tokens) else None
            opens = nxt.text in "{<" or (value is not None and value.text in ("{", "<"))
            entries.append(_Entry(stack[-1], tok.text, tok.line, tok.column,
                                  None if opens else value))
            if opens:
                stack.append(tok.text)
    return entries


def _entry_at(entries: list[_Entry], line: int, column: int) -> _Entry | None:
    """The field whose name or value starts at line:column, else the last one before it."""
    before = None
    for entry in entries:
        if (entry.line, entry.column) == (line, column) or (
                entry.value and (entry.value.line, entry.value.column) == (line, column)):
            return entry
        if (entry.line, entry.column) <= (line, column):
            before = entry
    return before


def _suggest(block: str, name: str) -> str:
    """' Did you mean ...?' from the closest known field name in any block (difflib)."""
    owners = [b for b in BLOCKS if name in known_fields(b)]
    if owners:
        return (f"; {name!r} belongs in {block_label(owners[0])}, not in {block_label(block)}"
                if owners[0] else f"; {name!r} is a top-level field, not part of {block}")
    best: tuple[float, str, str] | None = None
    for other in [block] + [b for b in BLOCKS if b != block]:  # current block wins ties
        for candidate in difflib.get_close_matches(name, known_fields(other), n=1, cutoff=0.6):
            score = difflib.SequenceMatcher(None, name, candidate).ratio()
            if best is None or score > best[0]:
                best = (score, other, candidate)
    if best is None:
        return f"; valid fields in {block_label(block)}: {', '.join(known_fields(block))}"
    _, other, candidate = best
    hint = f"; did you mean {candidate!r}?"
    if other != block:
        hint += (f" (a {other} field)" if other else " (a top-level field)")
    return hint


def _field_hint(block: str, name: str) -> Any:
    ignored = ignored_field(block, name)
    if ignored is not None:
        return {"bool": bool, "int": int, "float": float, "str": str}[ignored.kind]
    return field_types(block).get(name)


def _example(block: str, name: str) -> str:
    ignored = ignored_field(block, name)
    if ignored is not None:
        value: Any = ignored.default
    else:
        value = getattr(BLOCKS[block](), name)
    hint = _field_hint(block, name)
    if scalar_kind(hint) == "literal":
        return quote(format_literal(value, hint))
    if isinstance(value, str):
        return quote(value or "...")
    return format_value(value)


def _value_shown(lines: list[str], token: _Token | None) -> str:
    """The value as written: a string token, else the line from the token up to a comment or
    a closing brace (so an unquoted "(832, 1344)" shows whole)."""
    if token is None or token.line > len(lines):
        return ""
    if token.kind == "string":
        return token.text
    rest = lines[token.line - 1][token.column - 1:].split("#", 1)[0]
    rest = re.split(r"[}>]", rest, maxsplit=1)[0].strip()
    return rest if len(rest) <= 60 else rest[:57] + "..."


def _explain(exc: text_format.ParseError, text: str, source: str,
             entries: list[_Entry]) -> SpecError:
    """A text_format ParseError rewritten to name the field and what would be valid."""
    line, column = exc.GetLine(), exc.GetColumn()
    at = where(source, line, column)
    message = str(exc)
    entry = _entry_at(entries, line, column) if line else None
    unknown = re.search(r'Message type "([\w.]+)" has no field named "([^"]+)"', message)
    if unknown:
        block = block_of_message(unknown.group(1)) or ""
        name = unknown.group(2)
        return SpecError(f"{at}: unknown field {name!r} in {block_label(block)}"
                         f"{_suggest(block, name)}")
    if entry is None:
        return SpecError(f"{at}: syntax error: {_reason(message)}")
    field = dotted(entry.block, entry.name)
    hint = _field_hint(entry.block, entry.name)
    shown = _value_shown(text.split("\n"), entry.value)
    at_value = entry.value is not None and (entry.value.line, entry.value.column) == (line, column)
    if "should not have multiple" in message:
        return SpecError(f"{at}: {field} is given more than once; keep one")
    if 'Expected "}"' in message:
        return SpecError(f"{at}: a block is not closed: expected '}}' (last field read: {field})")
    if not at_value and not (entry.value is None and entry.line == line):
        return SpecError(f"{at}: syntax error after {field}: {_reason(message)}")
    if "missing ending quote" in message:
        return SpecError(f"{at}: the string of {field} is not closed on its line: a quoted "
                         "string must end on the line where it starts (join the lines)")
    if scalar_kind(hint) == "block" and 'Expected "{"' in message:
        return SpecError(f"{at}: {field} is a block: write {entry.name} {{ ... }}")
    if hint is not None and scalar_kind(hint) != "block" and 'Expected ":"' in message:
        return SpecError(f"{at}: {field} is a single value, not a block: write "
                         f"{entry.name}: {_example(entry.block, entry.name)}")
    if hint is not None and scalar_kind(hint) != "block" and any(
            key in message for key in ("Couldn't parse", "Value out of range", "Expected \"true",
                                       "Expected string", "Expected identifier",
                                       'Expected ":"', 'Expected "{"')):
        return SpecError(f"{at}: {field} = {shown}: expected {describe(_storage(hint))}, e.g. "
                         f"{entry.name}: {_example(entry.block, entry.name)}")
    return SpecError(f"{at}: syntax error near {field}: {_reason(message)}")


def _storage(hint: Any) -> Any:
    # List-valued fields are written as quoted strings in the file.
    return str if scalar_kind(hint) == "literal" else hint


def _reason(message: str) -> str:
    # text_format prefixes "line:col : " and often a quote of the line; both are said already.
    return re.sub(r"^\d+:\d+ : (?:'[^\n]*?': )?", "", message)


def _convert(message: Any, source: str, entries: list[_Entry]) -> ExperimentSpec:
    """Set fields -> dataclass values (defaults for the rest); ignored TLT fields draw warnings."""
    positions = {dotted(e.block, e.name): (e.line, e.column) for e in entries}
    values: dict[str, dict[str, Any]] = {}
    for block in ("data_config", "maskrcnn_config", ""):
        proto = getattr(message, block) if block else message
        values[block] = {}
        for name, hint in field_types(block).items():
            kind = scalar_kind(hint)
            if kind == "block" or not proto.HasField(name):
                continue
            field, value = dotted(block, name), getattr(proto, name)
            try:
                if field in PATH_FIELDS:
                    value = expand_env(value, field)
                if kind == "literal":
                    value = parse_literal(value, hint, field, _example(block, name).strip('"'))
            except SpecFieldError as exc:
                raise exc.located(source, *positions.get(field, (None, None))) from None
            values[block][name] = value
        for ignored in IGNORED_FIELDS:
            if ignored.block == block and proto.HasField(ignored.name):
                value = getattr(proto, ignored.name)
                if value != ignored.default:
                    field = dotted(block, ignored.name)
                    warnings.warn(
                        f"{where(source, *positions.get(field, (None, None)))}: {field} = "
                        f"{format_value(value)} is ignored: {ignored.reason}", SpecWarning,
                        stacklevel=4)
    blocks = {b: BLOCKS[b](**values[b]) for b in ("data_config", "maskrcnn_config")}
    return ExperimentSpec(**values[""], **blocks, source=source)


def parse_spec(text: str, source: str = "<string>") -> ExperimentSpec:
    """Parse and validate a TLT Mask R-CNN spec given as text.

    `source` names the text in error messages (load_spec passes the file path). Returns a frozen
    ExperimentSpec with every field resolved (defaults for fields not given). Raises SpecError
    (file:line:col: what is wrong and what would be valid); warns SpecWarning for TLT fields that
    are accepted but ignored when set to a non-default value, and for freeze_bn without checkpoint.
    """
    entries = _scan(text)
    message = experiment_message_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise _explain(exc, text, source, entries) from None
    spec = _convert(message, source, entries)
    positions = {dotted(e.block, e.name): (e.line, e.column) for e in entries}
    try:
        return validate_spec(spec)
    except SpecFieldError as exc:
        for field in (exc.field, *exc.related):
            if field in positions:
                raise exc.located(source, *positions[field]) from None
        raise


def load_spec(path: str | os.PathLike) -> ExperimentSpec:
    """Read, parse and validate a spec file (see parse_spec). Paths inside the spec are used as
    written, relative to the current working directory, not to the spec file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found (relative paths are taken from the "
                        f"current directory, {os.getcwd()})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") \
            from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc.strerror or exc}") from None
    return parse_spec(text, source=str(path))
