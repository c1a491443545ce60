"""Field values: TLT's list-valued strings, type coercion, environment variables, formatting.

TLT writes tuples as strings ("(832, 1344)", "[(1.0, 1.0), (1.4, 0.7)]") and evaluated them with
Python's eval(). Here they are read with ast.literal_eval, which accepts only literals (numbers,
tuples, lists, ...): a string such as "__import__('os').system('x')" is an error, never code.
"""

from __future__ import annotations

import ast
import math
import os
import re
import typing
from typing import Any

from google.protobuf import text_encoding

from .errors import SpecFieldError

# Longest list-valued string accepted: literal_eval on huge or deeply nested input can exhaust
# memory or the recursion limit; no real spec comes close.
_MAX_LITERAL_CHARS = 10_000
_ENV_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def describe(hint: Any) -> str:
    """Human wording of a field type, for error messages."""
    if hint is bool:
        return "a boolean (true or false)"
    if hint is int:
        return "a non-negative integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a quoted string"
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        inner = args[0]
        if typing.get_origin(inner) is tuple:
            return f"a list of ({', '.join(_word(a) for a in typing.get_args(inner))}) tuples"
        return f"a list of {_word(inner)}s"
    if len(set(args)) == 1:
        return f"a tuple of {len(args)} {_word(args[0])}s"
    return "a tuple (" + ", ".join(_word(a) for a in args) + ")"


def _word(hint: Any) -> str:
    return {int: "integer", float: "number"}.get(hint, getattr(hint, "__name__", str(hint)))


def format_value(value: Any) -> str:
    """A field value written as TLT writes it (before quoting): tuples of fixed length in
    parentheses "(832, 1344)", variable-length lists in brackets "[60000, 80000]"."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_format_item(v) for v in value) + "]"
    return str(value)


def _format_item(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_format_item(v) for v in value) + ")"
    return format_value(value)


def format_literal(value: Any, hint: Any) -> str:
    """TLT string of a tuple field: parentheses for fixed-length tuples, brackets for lists."""
    args = typing.get_args(hint)
    text = format_value(value)
    if args and args[-1] is not Ellipsis and text.startswith("["):
        text = "(" + text[1:-1] + ")"
    return text


def quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def parse_literal(text: str, hint: Any, field: str, example: str) -> tuple:
    """Parse a list-valued string field (e.g. "[60000, 80000]") into a tuple of `hint`'s shape.

    Raises SpecFieldError naming the field and showing a valid example.
    """
    def fail(why: str) -> SpecFieldError:
        return SpecFieldError(field, f"{field} = {quote(text)}: {why}; expected "
                                     f"{describe(hint)}, e.g. {field.rsplit('.', 1)[-1]}: "
                                     f"{quote(example)}")

    if len(text) > _MAX_LITERAL_CHARS:
        raise fail(f"longer than {_MAX_LITERAL_CHARS} characters")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise fail("not a literal list or tuple of numbers (only literals are read, "
                   "nothing is evaluated)") from None
    try:
        return coerce(value, hint, field)
    except SpecFieldError:
        raise fail(f"reads as {value!r}") from None


def coerce(value: Any, hint: Any, field: str) -> Any:
    """`value` converted to the field type `hint`: lists become tuples, ints become floats where
    a number is expected. Anything else (str for int, bool for int, wrong length, ...) raises
    SpecFieldError("<field> = <value>: expected ...")."""
    def fail(what: str = "") -> SpecFieldError:
        return SpecFieldError(field, f"{field} = {value!r}: expected {what or describe(hint)}")

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    args = typing.get_args(hint)
    if not isinstance(value, (tuple, list)):
        raise fail()
    if len(args) == 2 and args[1] is Ellipsis:
        items = [(v, args[0]) for v in value]
    elif len(value) != len(args):
        raise fail(f"{describe(hint)} (got {len(value)} values)")
    else:
        items = list(zip(value, args))
    try:
        return tuple(coerce(v, h, field) for v, h in items)
    except SpecFieldError:
        raise fail() from None


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def expand_env(text: str, field: str) -> str:
    """Replace $NAME and ${NAME} from the environment; "$$" is a literal "$".

    An unset variable raises SpecFieldError naming the field and the variable (an empty path
    would otherwise fail much later, far from its cause).
    """
    def replace(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(3)
        if name not in os.environ:
            raise SpecFieldError(field, f"{field} = {quote(text)}: environment variable "
                                        f"${name} is not set; export it or write the path out")
        return os.environ[name]

    return _ENV_VAR.sub(replace, text)


def escape_env(text: str) -> str:
    """Inverse of expand_env for literal text: "$" -> "$$"."""
    return text.replace("$", "$$")
