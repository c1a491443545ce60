"""Live training plot for notebooks: `train(spec, results_dir, on_log=TrainingMonitor(results_dir))`.

The monitor is a training hook (engine.hooks.HookBase) that listens to the trainer's train and
eval records (engine.logging.train_record, engine.hooks.eval_record); it is also a plain callable
for anything else that produces such records. It redraws one figure in place (a Jupyter display
handle, so the cell shows a single, updating picture) and appends every record to
RESULTS_DIR/notebook_log.jsonl. A monitor built on the same results directory reads that file
back, so re-running the training cell (which resumes from the last checkpoint) continues the
curves instead of starting them anew.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from matplotlib.figure import Figure

from mrcnn_helpers.engine.hooks import HookBase
from mrcnn_helpers.fileio import atomic_write

from .plots import BLUE, FONT_SIZE, ORANGE, figure_png, new_figure, series_color, style_axes

HISTORY_FILE = "notebook_log.jsonl"
# Loss terms plotted thin under the total (keys of the trainer's train records).
LOSS_TERMS = ("rpn_score_loss", "rpn_box_loss", "fast_rcnn_class_loss", "fast_rcnn_box_loss",
              "mask_loss", "l2_loss")
EVAL_KEYS = ("AP", "AP50", "mask_AP", "mask_AP50")


def _plain(record: dict) -> dict:
    """The JSON-safe scalars of a record (strings, ints, finite floats)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, str)) or isinstance(value, float) and math.isfinite(value):
            out[key] = value
    return out


class TrainingMonitor(HookBase):
    """Hook (or callable) for `train(..., on_log=monitor)` drawing loss, throughput and AP curves.

    results_dir: where the history file lives (None: keep the history in memory only).
    min_interval: least seconds between redraws of train records (evaluations and the last step
    always redraw), so fast GPU logging does not spend its time plotting. show: display the
    figure in the running Jupyter kernel (no effect outside one).
    Attributes: train_records / eval_records, lists of the records received, in step order.
    """

    def __init__(self, results_dir: str | os.PathLike | None = None, *, min_interval: float = 1.0,
                 show: bool = True):
        self.path = Path(results_dir) / HISTORY_FILE if results_dir is not None else None
        self.min_interval = float(min_interval)
        self.train_records: list[dict] = []
        self.eval_records: list[dict] = []
        self._handle = None
        self._last_draw = 0.0
        self._show = show
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self._add(json.loads(line))
        self.redraw()

    def on_record(self, record: dict) -> None:
        self(record)

    def __call__(self, record: dict) -> None:
        record = _plain(record)
        if record.get("event") not in ("train", "eval") or "step" not in record:
            return
        truncated = self._add(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncated:  # a resumed run repeats steps: keep the file equal to the history
                lines = [json.dumps(r) for r in sorted(self.train_records + self.eval_records,
                                                       key=lambda r: (r["step"], r["event"]))]
                atomic_write(self.path, "".join(line + "\n" for line in lines))
            else:  # an append-only log: one line per record
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
        last = record["step"] >= record.get("total_steps", math.inf)
        if (record["event"] == "eval" or last
                or time.monotonic() - self._last_draw >= self.min_interval):
            self.redraw()

    def _add(self, record: dict) -> bool:
        """Add a record; drop stored ones it supersedes (from the part of an interrupted run
        after its last checkpoint). Returns True when something was dropped."""
        step = int(record["step"])
        before = len(self.train_records) + len(self.eval_records)
        self.eval_records = [r for r in self.eval_records if r["step"] < step]
        if record["event"] == "train":
            self.train_records = [r for r in self.train_records if r["step"] < step]
            self.train_records.append(record)
        else:
            self.eval_records.append(record)
        return len(self.train_records) + len(self.eval_records) <= before

    def figure(self) -> Figure:
        """The current plot: losses, throughput and learning rate, evaluation AP (by step)."""
        fig = new_figure((14, 4.2))
        ax_loss, ax_speed, ax_ap = fig.subplots(1, 3)
        train = self.train_records
        steps = [r["step"] for r in train]
        # Markers while there are few points: a single log would otherwise draw nothing.
        marker = "." if len(train) < 50 else None
        if train:
            for k, key in enumerate(LOSS_TERMS):
                if any(key in r for r in train):
                    ax_loss.plot(steps, [r.get(key, math.nan) for r in train], linewidth=1,
                                 marker=marker, label=key.replace("_loss", ""),
                                 color=series_color(k))
            ax_loss.plot(steps, [r["total_loss"] for r in train], color="black", linewidth=2.2,
                         marker=marker, label="total")
            ax_loss.legend(fontsize=FONT_SIZE, ncol=2)
            last = train[-1]
            style_axes(ax_loss, title=f"loss {last['total_loss']:.4f} at step {last['step']}"
                                      f"/{last.get('total_steps', '?')}")
            ax_speed.plot(steps, [r["samples_per_sec"] for r in train], color=BLUE,
                          marker=marker)
            style_axes(ax_speed, title=f"throughput {last['samples_per_sec']:.1f} samples/s")
            ax_lr = ax_speed.twinx()
            ax_lr.plot(steps, [r["learning_rate"] for r in train], color=ORANGE, linewidth=1,
                       marker=marker)
            ax_lr.set_ylabel("learning rate", color=ORANGE, fontsize=FONT_SIZE)
            ax_lr.tick_params(labelsize=FONT_SIZE)
        else:
            ax_loss.text(0.5, 0.5, "waiting for the first log", ha="center", va="center",
                         transform=ax_loss.transAxes, fontsize=FONT_SIZE)
            style_axes(ax_loss, title="loss")
            style_axes(ax_speed, title="throughput")
        style_axes(ax_loss, xlabel="step")
        style_axes(ax_speed, xlabel="step")
        ax_speed.set_ylabel("samples/s", color=BLUE, fontsize=FONT_SIZE)
        ax_speed.set_ylim(bottom=0)
        if self.eval_records:
            eval_steps = [r["step"] for r in self.eval_records]
            for k, key in enumerate(EVAL_KEYS):
                if any(key in r for r in self.eval_records):
                    ax_ap.plot(eval_steps, [r.get(key, math.nan) for r in self.eval_records],
                               marker="o", label=key, color=series_color(k))
            ax_ap.legend(fontsize=FONT_SIZE)
            best = max(self.eval_records, key=lambda r: r.get("mask_AP", r.get("AP", 0.0)))
            style_axes(ax_ap, title=f"evaluation (best mask AP {best.get('mask_AP', math.nan):.3f}"
                                    f" at step {best['step']})")
        else:
            ax_ap.text(0.5, 0.5, "no evaluation yet\n(every num_steps_per_eval steps)",
                       ha="center", va="center", transform=ax_ap.transAxes, fontsize=FONT_SIZE)
            style_axes(ax_ap, title="evaluation")
        style_axes(ax_ap, "step", "AP")
        ax_ap.set_ylim(0, None)
        return fig

    def redraw(self) -> None:
        """Draw the figure into this monitor's display (created on the first call)."""
        self._last_draw = time.monotonic()
        if not self._show:
            return
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        image = Image(data=figure_png(self.figure()), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)
