"""Figures written as PNG files (results.png of training, the plots of `mrcnn evaluate`).

matplotlib is a dependency, and still optional at run time: `matplotlib_missing()` says in one line why plots
are skipped, and nothing here imports it before a figure is made. Figures use matplotlib's object
API (`matplotlib.figure.Figure`, never pyplot's global state), are rendered by Agg at FIGURE_DPI,
with legends, labels and ticks at FONT_SIZE points or more. `save_png` writes atomically
(fileio.atomic_write): a reader sees the previous PNG or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.fileio import atomic_write

FIGURE_DPI = 120  # dots per inch of every figure written
FONT_SIZE = 10    # points: legends, axis labels, ticks, annotations
TITLE_SIZE = 12   # points: axes titles
MISSING_NOTE = "matplotlib is not installed (pip install matplotlib)"


def matplotlib_missing() -> str | None:
    """None when matplotlib imports, else a one-line note naming what to install."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return MISSING_NOTE
    return None


def new_figure(figsize: tuple[float, float], **kwargs):
    """A `matplotlib.figure.Figure` of `figsize` inches at FIGURE_DPI, constrained layout unless
    told otherwise. Raises ImportError when matplotlib is missing (see matplotlib_missing)."""
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    return Figure(figsize=figsize, dpi=FIGURE_DPI, **kwargs)


def style_axes(ax, xlabel: str | None = None, ylabel: str | None = None,
               title: str | None = None) -> None:
    """Axis labels and tick labels at FONT_SIZE, the title at TITLE_SIZE."""
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    if title is not None:
        ax.set_title(title, fontsize=TITLE_SIZE)
    ax.tick_params(labelsize=FONT_SIZE)


def figure_png(fig) -> bytes:
    """PNG bytes of `fig` rendered by Agg at FIGURE_DPI (or its own dpi when higher)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=max(float(fig.dpi), FIGURE_DPI),
                facecolor="white", edgecolor="white")
    return buffer.getvalue()


def save_png(fig, path: str | os.PathLike, *, error: type = MrcnnError, what: str = "") -> Path:
    """Write `fig` as a PNG file at `path` atomically; returns the path. Raises `error` naming the
    path when it cannot be written (the previous file, if any, is then unchanged)."""
    return atomic_write(path, figure_png(fig), error=error, what=what or "plot")
