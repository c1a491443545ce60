"""Errors the toolkit raises for bad input: each names the file, field or line and what is valid.

The CLI prints these as one clear message (no traceback) and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class MrcnnError(Exception):
    """Base class of every user-facing error of the toolkit."""


class SpecError(MrcnnError):
    """A spec file is malformed, has an unknown field, a wrong type or an impossible value."""


class DataError(MrcnnError):
    """A dataset, annotation file or image cannot be used as given."""


class CheckpointError(MrcnnError):
    """A checkpoint or weights file is missing, unreadable, untrusted or does not fit the model."""


class TrainingError(MrcnnError):
    """Training cannot go on (for example a non-finite loss)."""
