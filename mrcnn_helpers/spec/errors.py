"""Spec-specific error and warning classes."""

from __future__ import annotations

from mrcnn_helpers.errors import SpecError


class SpecWarning(UserWarning):
    """A spec that loads but probably does not do what was meant (e.g. frozen BN from scratch)."""


def where(source: str, line: int | None = None, column: int | None = None) -> str:
    """'file:line:col' (compiler style) or just 'file' when the position is not known."""
    if line is None:
        return source
    return f"{source}:{line}:{column}" if column is not None else f"{source}:{line}"


class SpecFieldError(SpecError):
    """A field has a value that cannot be used: wrong type, unparsable literal, impossible value.

    Attributes: `field` (dotted name, e.g. "maskrcnn_config.mrcnn_resolution"), `detail` (the
    message without position), `source`, `line`, `column` (1-based; None when the value did not
    come from a file position, e.g. after dataclasses.replace), `related` (other fields of a
    cross-field rule; the loader points at the first of field + related written in the file).
    """

    def __init__(self, field: str, detail: str, *, source: str = "<spec>",
                 line: int | None = None, column: int | None = None,
                 related: tuple[str, ...] = ()):
        self.field = field
        self.related = related
        self.detail = detail
        self.source = source
        self.line = line
        self.column = column
        super().__init__(f"{where(source, line, column)}: {detail}")

    def located(self, source: str, line: int | None, column: int | None) -> SpecFieldError:
        """The same error pointing at a file position."""
        return SpecFieldError(self.field, self.detail, source=source, line=line, column=column,
                              related=self.related)
