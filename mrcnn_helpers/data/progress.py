"""Progress bars of the data commands: tqdm on stderr, shown only on a terminal.

Long data steps (the dataset doctor, converters, TFRecord writing, download extraction and MD5
checks) report progress through progress_bar. The bar draws only when stderr is a terminal, so
logs, CI output and notebooks captured to files stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str, *, total: int | None = None,
                 unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """`iterable` wrapped in a tqdm bar on stderr, drawn only when enabled and stderr is a TTY."""
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr,
                     disable=None if enabled else True, leave=False))


def byte_bar(desc: str, total: int | None, *, initial: int = 0, enabled: bool = True) -> tqdm:
    """A tqdm bar counting bytes (update it by hand), drawn as progress_bar."""
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, disable=None if enabled else True,
                leave=False)
