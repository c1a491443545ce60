"""Training you can watch: one progress line per log, TLT's metric blocks, train.log, TensorBoard.

Every `logging_frequency` steps the averages over the steps since the previous log become a train
record (`train_record`), printed as one line wherever the run is watched

    step 400/2500 | loss 1.8421 (rpn 0.3122, frcnn 0.6107, mask 0.5310, l2 0.3882) | lr 0.01
        | 96.4 img/s | 16% ETA 0:07:35                                      (one line, wrapped here)

(on a terminal tqdm's bar stays at the bottom and the lines are written above it; in a pipe, a
file or a notebook there is no bar, only the lines), or, with `tlt_log`, as TLT's block

    step: 400/2500
    throughput: 96.4 samples/sec
    ==================== Metrics =====================
    FastRCNN box loss: 0.27979
    ...
    Total loss: 1.84211

"Total loss" includes the L2 loss, as TLT's does. ETA counts training only (the img/s of the last
window, which leaves checkpoint and evaluation time out). RESULTS_DIR/train.log receives every
line and block with a timestamp, the evaluation metrics and the run's messages, whatever is
printed. Evaluations print one line: AP, AP50, mask AP, mask AP50 (pycocotools' -1 for an
undefined value is shown as n/a).
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mrcnn_helpers.engine.hooks import HookBase
from mrcnn_helpers.engine.optim import l2_loss_of
from mrcnn_helpers.errors import TrainingError
from mrcnn_helpers.fileio import describe_os_error
from mrcnn_helpers.model import kernels

# Loss keys the model returns (already weighted) and the derived ones, with TLT's log labels.
LOG_LABELS = {
    "fast_rcnn_box_loss": "FastRCNN box loss",
    "fast_rcnn_class_loss": "FastRCNN class loss",
    "fast_rcnn_total_loss": "FastRCNN total loss",
    "l2_loss": "L2 loss",
    "learning_rate": "Learning rate",
    "mask_loss": "Mask loss",
    "rpn_box_loss": "RPN box loss",
    "rpn_score_loss": "RPN score loss",
    "rpn_total_loss": "RPN total loss",
    "total_loss": "Total loss",
}
_DERIVED = {
    "fast_rcnn_total_loss": ("fast_rcnn_class_loss", "fast_rcnn_box_loss"),
    "rpn_total_loss": ("rpn_score_loss", "rpn_box_loss"),
}
EVAL_LINE_KEYS = ("AP", "AP50", "mask_AP", "mask_AP50")
# Train-record keys that are not measurements (left out of TensorBoard).
_NOT_SCALARS = ("event", "step", "total_steps", "eta_seconds")


def _fmt(value: float) -> str:
    # TLT prints 5 decimals, dropping trailing zeros (0.00014, 1.3277).
    return str(round(float(value), 5))


def format_metric_value(value: Any, digits: int = 9) -> str:
    """A metric for printing: ints as ints, floats with `digits` decimals, and "n/a" for None,
    NaN and pycocotools' -1 (no ground truth in that area range or class)."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value) or value == -1.0:
        return "n/a"
    return f"{value:.{digits}f}"


def format_duration(seconds: float | None) -> str:
    """h:mm:ss ("?" when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def train_record(step: int, total_steps: int, averages: dict[str, float], *,
                 samples_per_sec: float, learning_rate: float, l2_loss: float,
                 eta_seconds: float | None = None) -> dict:
    """The train record of a logging window: {"event": "train", "step", "total_steps",
    "samples_per_sec", <each loss term's average>, "rpn_total_loss", "fast_rcnn_total_loss",
    "l2_loss", "learning_rate", "total_loss" (terms + L2, as TLT), "eta_seconds" (when known)}."""
    record: dict[str, Any] = {"event": "train", "step": int(step), "total_steps": int(total_steps),
                              "samples_per_sec": float(samples_per_sec)}
    terms = {key: float(value) for key, value in sorted(averages.items())}
    record.update(terms)
    for name, parts in _DERIVED.items():
        if all(part in terms for part in parts):
            record[name] = sum(terms[part] for part in parts)
    record["l2_loss"] = float(l2_loss)
    record["learning_rate"] = float(learning_rate)
    record["total_loss"] = sum(terms.values()) + float(l2_loss)
    if eta_seconds is not None:
        record["eta_seconds"] = float(eta_seconds)
    return record


def format_line(record: dict) -> str:
    """One line of a train record: step, losses, lr, img/s, percent done and ETA."""
    parts = [f"step {record['step']}/{record['total_steps']}",
             f"loss {record['total_loss']:.4f}"]
    short = {"rpn_total_loss": "rpn", "fast_rcnn_total_loss": "frcnn", "mask_loss": "mask",
             "l2_loss": "l2"}
    detail = [f"{name} {record[key]:.4f}" for key, name in short.items() if key in record]
    if detail:
        parts[-1] += " (" + ", ".join(detail) + ")"
    parts.append(f"lr {record['learning_rate']:.3g}")
    parts.append(f"{record['samples_per_sec']:.1f} img/s")
    done = 100.0 * record["step"] / max(int(record["total_steps"]), 1)
    parts.append(f"{done:.0f}% ETA {format_duration(record.get('eta_seconds'))}")
    return " | ".join(parts)


def format_block(record: dict) -> str:
    """TLT's training log block of a train record."""
    lines = [f"step: {record['step']}/{record['total_steps']}",
             f"throughput: {record['samples_per_sec']:.1f} samples/sec",
             "==================== Metrics ====================="]
    extra = sorted(k for k in record if k.endswith("_loss") and k not in LOG_LABELS)
    for key, label in LOG_LABELS.items():
        if key in record:
            lines.append(f"{label}: {_fmt(record[key])}")
    lines += [f"{key}: {_fmt(record[key])}" for key in extra]
    return "\n".join(lines)


def format_eval_line(record: dict, total_steps: int) -> str:
    """`step 6/20 eval: AP 0.2500, AP50 0.5000, mask_AP 0.1250, mask_AP50 n/a`."""
    parts = [f"{key} {format_metric_value(record[key], 4)}" for key in EVAL_LINE_KEYS
             if key in record]
    return f"step {record['step']}/{total_steps} eval: " + (", ".join(parts) or "no AP")


def format_eval_block(record: dict) -> str:
    """TLT's metrics block of an eval record: `name: value` per scalar metric, sorted."""
    lines = ["=========== Metrics ==========="]
    lines += [f"{key}: {format_metric_value(value)}" for key, value in sorted(record.items())
              if key not in ("event", "step")]
    return "\n".join(lines)


class ConsoleWriter(HookBase):
    """Prints records and messages on stdout, with a progress bar on a terminal only.

    blocks: TLT's blocks instead of one line per log. progress: show the bar where stdout is a
    terminal (tqdm's disable=None); never in pipes, files or notebooks.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, blocks: bool = False,
                 progress: bool = True):
        self.total_steps = int(total_steps)
        self.blocks = blocks
        self.bar = tqdm(total=self.total_steps, initial=int(start_step), desc="train",
                        unit="step", mininterval=2.0, dynamic_ncols=True,
                        disable=None if progress else True, file=sys.stdout)

    def write(self, text: str) -> None:
        """Print `text` above the bar."""
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def after_step(self) -> None:
        self.bar.update(1)

    def on_record(self, record: dict) -> None:
        event = record.get("event")
        if event == "train":
            self.bar.set_postfix(loss=f"{record['total_loss']:.4f}", refresh=False)
            self.write(format_block(record) if self.blocks else format_line(record))
        elif event == "eval":
            self.write_eval(record)
        elif event == "message":
            self.write(record["text"])

    def write_eval(self, record: dict, source: str = "") -> None:
        """The evaluation line (with the file holding the metrics), and TLT's block if blocks."""
        self.write(format_eval_line(record, self.total_steps) + (f" ({source})" if source else ""))
        if self.blocks:
            self.write(format_eval_block(record))

    def after_train(self) -> None:
        self.bar.close()


class TensorBoardWriter(HookBase):
    """Train and eval scalars as TensorBoard events in `log_dir` (when tensorboard imports)."""

    def __init__(self, log_dir: str | os.PathLike):
        try:  # optional at run time: without it the logs still go to stdout and train.log
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            SummaryWriter = None
        self.writer = SummaryWriter(log_dir=os.fspath(log_dir)) if SummaryWriter else None

    def on_record(self, record: dict) -> None:
        event = record.get("event")
        if self.writer is None or event not in ("train", "eval"):
            return
        for key, value in record.items():
            if (key not in _NOT_SCALARS and isinstance(value, (int, float))
                    and math.isfinite(value)):
                self.writer.add_scalar(f"{event}/{key}", value, record["step"])
        if event == "eval":
            self.writer.flush()

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrainLog(HookBase):
    """RESULTS_DIR/train.log: every record (line and TLT block), evaluation metrics (with the
    per-class AP) and message, each line prefixed with a timestamp; appended across runs.

    An append-only log, written line by line (a rewrite per line would cost the square of its
    length); a line cut short by a killed run stays as it is.
    """

    def __init__(self, path: str | os.PathLike, notes: list[str] = ()):
        self.path = Path(path)
        self.notes = list(notes)  # messages from before the log was open
        self.handle = None

    def before_train(self) -> None:
        try:
            self.handle = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise TrainingError(f"cannot open {self.path}: {describe_os_error(exc)}") from None
        for text in self.notes:
            self.write(text)

    def write(self, text: str) -> None:
        if self.handle is None:
            return
        stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        self.handle.write("".join(f"{stamp} | {line}\n" for line in text.splitlines()))
        self.handle.flush()

    def on_record(self, record: dict) -> None:
        event = record.get("event")
        if event == "train":
            self.write(format_line(record) + "\n" + format_block(record))
        elif event == "eval":
            total = self.trainer.total_steps if self.trainer is not None else "?"
            self.write(format_eval_line(record, total) + "\n" + format_eval_block(record))
            metrics = getattr(self.trainer, "metrics", None) or {}
            for name, values in (metrics.get("per_class") or {}).items():
                if isinstance(values, dict):
                    cells = ", ".join(f"{k} {format_metric_value(v, 4)}"
                                      for k, v in values.items())
                else:
                    cells = format_metric_value(values, 4)
                self.write(f"per class {name}: {cells}")
        elif event == "checkpoint":
            self.write(f"checkpoint {record['path']}")
        elif event == "message":
            self.write(record["text"])

    def after_train(self) -> None:
        if self.handle is not None:
            error = getattr(self.trainer, "error", None)
            if error is not None:
                self.write(f"training stopped at step {self.trainer.step}: "
                           f"{type(error).__name__}: {error}")
            self.handle.close()
            self.handle = None


class LoggingHook(HookBase):
    """Turns the loss sums of each logging window into a train record and publishes it.

    Runs every `period` steps and at the last step. It reads the device-side sums once per
    window (averaged over ranks) and computes TLT's L2 loss only then; throughput leaves out the
    time the trainer spent paused (checkpoints, evaluations) and the run's first step, which
    pays once for compiling the GPU kernels, building cuDNN plans and capturing the step's
    graph (a minute or more on a fresh machine: the first window's ETA would be hours); a note
    says how long it took when that was over FIRST_STEP_NOTE_S.
    """

    FIRST_STEP_NOTE_S = 5.0

    def __init__(self, period: int, batch_size: int, decayed: list, l2_weight_decay: float):
        self.period = max(1, int(period))
        self.batch_size = int(batch_size)
        self.decayed = decayed
        self.l2_weight_decay = float(l2_weight_decay)
        self._first_step_seconds = None  # until the first step of this run is over
        self._first_in_window = False

    def before_train(self) -> None:
        self._start_window()
        self._first_step_seconds = None

    def _start_window(self) -> None:
        self._window_start = time.perf_counter()
        self._paused_at_start = self.trainer.paused_seconds

    def _end_first_step(self) -> None:
        """Time the run's first step (waiting for the device once) and start the window after
        it, so that the first window's throughput counts the steps that follow it."""
        trainer = self.trainer
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        self._first_step_seconds = time.perf_counter() - self._window_start
        if self._first_step_seconds > self.FIRST_STEP_NOTE_S:
            trainer.say(f"note: the first step took {self._first_step_seconds:.1f} s (kernel "
                        "compilation, cuDNN plans, graph capture: paid once; img/s and ETA "
                        f"leave it out){kernels.first_use_note(self._first_step_seconds)}")
        self._first_in_window = True
        self._start_window()

    def after_step(self) -> None:
        trainer = self.trainer
        step = trainer.step
        if self._first_step_seconds is None:
            self._end_first_step()
        if not (step % self.period == 0 or step == trainer.total_steps):
            return
        trainer.check_finite()  # a log never shows the average of a non-finite window
        averages, count = trainer.meter.read_window(trainer.ctx)
        elapsed = (time.perf_counter() - self._window_start
                   - (trainer.paused_seconds - self._paused_at_start))
        # The window holding the first step timed only the steps after it.
        timed = count - 1 if self._first_in_window else count
        if timed <= 0:  # the first step is all the window has: time it with the rest
            timed, elapsed = count, elapsed + self._first_step_seconds
        self._first_in_window = False
        rate = timed * self.batch_size / max(elapsed, 1e-9)
        eta = (trainer.stop_step - step) * self.batch_size / rate if rate > 0 else None
        record = train_record(step, trainer.total_steps, averages, samples_per_sec=rate,
                              learning_rate=trainer.lr,
                              l2_loss=l2_loss_of(self.decayed, self.l2_weight_decay),
                              eta_seconds=eta)
        trainer.publish(record)
        self._start_window()
