"""results.png beside results.csv: the run's curves at a glance.

Six panels drawn from results.csv (engine.artifacts.ResultsCsv), so a resumed run's picture
covers the whole run: the loss totals, the loss terms, the learning rate and the throughput
(img/s) of every log, then box and mask AP (AP, AP50, AP75) of every evaluation, over the global
step. `ResultsPlot` redraws it after each evaluation (at most every MIN_INTERVAL seconds) and
where training stops. Without matplotlib (a dependency, still optional at run time) the
picture is skipped with one note; a picture that cannot be drawn or written is one note too,
never the end of training.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

from mrcnn_helpers.engine.hooks import HookBase
from mrcnn_helpers.errors import TrainingError
from mrcnn_helpers.fileio import describe_os_error
from mrcnn_helpers.plotting import FONT_SIZE, matplotlib_missing, new_figure, save_png, style_axes

RESULTS_PNG = "results.png"
MIN_INTERVAL = 10.0  # seconds between two drawings before the stop step
# (title, y label, columns, event whose rows hold them)
PANELS = (
    ("loss", "loss", ("total_loss", "rpn_total_loss", "fast_rcnn_total_loss", "mask_loss"),
     "train"),
    ("loss terms", "loss", ("rpn_score_loss", "rpn_box_loss", "fast_rcnn_class_loss",
                            "fast_rcnn_box_loss", "l2_loss"), "train"),
    ("learning rate", "learning rate", ("learning_rate",), "train"),
    ("throughput", "img/s", ("samples_per_sec",), "train"),
    ("box AP", "AP", ("AP", "AP50", "AP75"), "eval"),
    ("mask AP", "AP", ("mask_AP", "mask_AP50", "mask_AP75"), "eval"),
)


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_results_csv(path: str | os.PathLike) -> dict[str, dict[str, list]]:
    """{event: {column: values}} of results.csv, one list entry per row of that event, in file
    order ("step" as ints; other cells as floats, None where empty or not a number). Rows of
    another length than the header (a line cut short) are left out."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    table: dict[str, dict[str, list]] = {}
    if not rows:
        return table
    header = rows[0]
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        cells = dict(zip(header, row))
        step = _number(cells.get("step"))
        if step is None:
            continue
        columns = table.setdefault(cells.get("event", ""), {"step": []})
        columns["step"].append(int(step))
        for name in header:
            if name not in ("step", "event", "time"):
                columns.setdefault(name, []).append(_number(cells[name]))
    return table


def results_figure(table: dict[str, dict[str, list]]):
    """The six-panel Figure of a read_results_csv table (a panel without values says so)."""
    fig = new_figure((15.0, 7.5))
    axes = fig.subplots(2, 3).reshape(-1)
    for ax, (title, ylabel, columns, event) in zip(axes, PANELS, strict=True):
        rows = table.get(event, {})
        drawn = 0
        for name in columns:
            values = rows.get(name) or []  # a column an older header lacks: no line
            points = [(s, v) for s, v in zip(rows.get("step", []), values, strict=False)
                      if v is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if event == "eval" else None, markersize=4,
                        linewidth=1.6, label=name)
                drawn += 1
        if not drawn:
            what = "no evaluation yet" if event == "eval" else "no values"
            ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=FONT_SIZE,
                    transform=ax.transAxes)
        elif len(columns) > 1:
            ax.legend(fontsize=FONT_SIZE)
        if event == "eval" and drawn:
            ax.set_ylim(0.0, max(1.0, ax.get_ylim()[1]))
        style_axes(ax, "step", ylabel, title)
        ax.grid(alpha=0.3)
    return fig


def write_results_png(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Draw results.csv into `png_path` (atomically); None when the file holds no row yet.
    Raises ImportError without matplotlib, TrainingError when the PNG cannot be written."""
    table = read_results_csv(csv_path)
    if not any(columns["step"] for columns in table.values()):
        return None
    return save_png(results_figure(table), png_path, error=TrainingError, what="results.png")


class ResultsPlot(HookBase):
    """Keeps `png_path` (results.png) drawn from `csv_path` (results.csv).

    Redraws after each evaluation and at the stop step (or at the end of a run that fails), when
    records came since the last drawing. An evaluation within `min_interval` seconds of the
    start or of the previous drawing is drawn at the next one instead (default MIN_INTERVAL: a
    run evaluating every few seconds spends its time training, not drawing); the stop step
    always is. Register it after ResultsCsv and after the hooks that publish records (the last
    train record and evaluation of the stop step come from the logging and evaluation hooks),
    so the file it reads is complete.
    """

    def __init__(self, csv_path: str | os.PathLike, png_path: str | os.PathLike, *,
                 min_interval: float | None = None):
        self.csv_path, self.png_path = Path(csv_path), Path(png_path)
        self.min_interval = MIN_INTERVAL if min_interval is None else float(min_interval)
        self.pending = False  # records published since the last drawing
        self.disabled = False
        self.last_drawn = time.monotonic()

    def before_train(self) -> None:
        self.last_drawn = time.monotonic()

    def on_record(self, record: dict) -> None:
        event = record.get("event")
        if event in ("train", "eval"):
            self.pending = True
        if event == "eval" and time.monotonic() - self.last_drawn >= self.min_interval:
            self.refresh()

    def after_step(self) -> None:
        if self.trainer.step == self.trainer.stop_step and self.pending:
            self.refresh()

    def after_train(self) -> None:
        if self.pending:
            self.refresh()

    def refresh(self) -> None:
        """Redraw; any failure is one note (trainer.say) and training goes on."""
        self.pending = False
        self.last_drawn = time.monotonic()
        if self.disabled:
            return
        missing = matplotlib_missing()
        if missing is not None:
            self.disabled = True
            self.trainer.say(f"note: {RESULTS_PNG} not drawn: {missing}")
            return
        try:
            write_results_png(self.csv_path, self.png_path)
        except TrainingError as exc:  # names the path and the OS error
            self.trainer.say(f"note: {exc}")
        except Exception as exc:  # noqa: BLE001 (a picture never stops training)
            self.trainer.say(f"note: {self.png_path} not updated: {describe_os_error(exc)}")
