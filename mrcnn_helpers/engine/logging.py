"""Training log: running loss averages, TLT-style metric blocks, TensorBoard, progress bar.

Every `logging_frequency` steps the averages over the steps since the previous log are printed,
either as TLT's block (verbose, as in TLT's training log)

    throughput: 34.4 samples/sec
    ==================== Metrics =====================
    FastRCNN box loss: 0.27979
    ...
    Total loss: 3.19912

or as one line that fits a notebook cell. "Total loss" includes the L2 loss, as TLT's does.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

from tqdm.auto import tqdm

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


def _fmt(value: float) -> str:
    # TLT prints 5 decimals, dropping trailing zeros (0.00014, 1.3277).
    return str(round(float(value), 5))


class MetricLogger:
    """Averages loss terms over each logging window and reports them.

    Reports go to stdout (through tqdm so a progress bar stays intact), to TensorBoard scalars in
    `tensorboard_dir` (when the `tensorboard` package is importable and `rank == 0`), and to
    `on_log(record)`, a callback for live plots that receives plain dicts:
    train records `{"event": "train", "step", "total_steps", "samples_per_sec", "learning_rate",
    "l2_loss", "total_loss", <each loss term>, "rpn_total_loss", "fast_rcnn_total_loss"}` and
    eval records `{"event": "eval", "step", <each scalar metric>}`.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        logging_frequency: int,
        batch_size: int,
        start_step: int = 0,
        tensorboard_dir: str | os.PathLike | None = None,
        verbose: bool = True,
        on_log: Callable[[dict], Any] | None = None,
        rank: int = 0,
        progress: bool = True,
    ):
        self.total_steps = int(total_steps)
        self.logging_frequency = max(1, int(logging_frequency))
        self.batch_size = int(batch_size)
        self.verbose = verbose
        self.on_log = on_log
        self.rank = rank
        self.writer = None
        if tensorboard_dir is not None and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time: logs still go to stdout
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=os.fspath(tensorboard_dir))
        # disable=None: no bar when stdout is not a terminal (CI logs, files), so logs stay clean.
        self.bar = tqdm(
            total=self.total_steps,
            initial=int(start_step),
            desc="train",
            unit="step",
            mininterval=2.0,
            dynamic_ncols=True,
            disable=None if (progress and rank == 0) else True,
            file=sys.stdout,
        )
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0
        self._window_start = time.perf_counter()

    def write(self, text: str) -> None:
        """Print `text` (rank 0 only) without breaking the progress bar."""
        if self.rank == 0:
            self.bar.write(text, file=sys.stdout)

    def update(self, terms: dict[str, float]) -> None:
        """Add one step's loss terms (plain floats, keyed as the model returns them)."""
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        self.bar.update(1)

    def exclude_time(self, seconds: float) -> None:
        """Leave `seconds` (checkpointing, evaluation) out of the current throughput window."""
        self._window_start += seconds

    def should_log(self, step: int) -> bool:
        """True at steps that are multiples of logging_frequency, and at the last step."""
        return step % self.logging_frequency == 0 or step == self.total_steps

    def log(self, step: int, *, learning_rate: float, l2_loss: float) -> dict:
        """Report the averages since the previous log at global step `step`; returns the record."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        count = max(self._count, 1)
        record: dict[str, Any] = {"event": "train", "step": int(step),
                                  "total_steps": self.total_steps,
                                  "samples_per_sec": self._count * self.batch_size / elapsed}
        terms = {key: value / count for key, value in sorted(self._sums.items())}
        record.update(terms)
        for name, parts in _DERIVED.items():
            if all(part in terms for part in parts):
                record[name] = sum(terms[part] for part in parts)
        record["l2_loss"] = float(l2_loss)
        record["learning_rate"] = float(learning_rate)
        # TLT's "Total loss" is the optimized objective: the loss terms plus the L2 penalty.
        record["total_loss"] = sum(terms.values()) + float(l2_loss)
        self._reset_window()

        if self.rank == 0:
            self.write(self.format_block(record) if self.verbose else self.format_line(record))
            self.bar.set_postfix(loss=f"{record['total_loss']:.4f}", refresh=False)
            if self.writer is not None:
                for key, value in record.items():
                    if key not in ("event", "step", "total_steps") and math.isfinite(value):
                        self.writer.add_scalar(f"train/{key}", value, step)
        if self.on_log is not None:
            self.on_log(dict(record))
        return record

    def log_eval(self, step: int, metrics: dict, *, source: str = "") -> dict:
        """Report evaluation metrics of global step `step` (only top-level numbers are logged)."""
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"event": "eval", "step": int(step), **scalars}
        if self.rank == 0:
            parts = [f"{key} {scalars[key]:.4f}" for key in ("AP", "AP50", "mask_AP", "mask_AP50")
                     if key in scalars]
            line = f"step {step}/{self.total_steps} eval: " + (", ".join(parts) or "no AP")
            self.write(line + (f" ({source})" if source else ""))
            if self.verbose and scalars:
                lines = ["=========== Metrics ==========="]
                lines += [f"{key}: {value:.9f}" for key, value in sorted(scalars.items())]
                self.write("\n".join(lines))
            if self.writer is not None:
                for key, value in scalars.items():
                    self.writer.add_scalar(f"eval/{key}", value, step)
                self.writer.flush()
        if self.on_log is not None:
            self.on_log(dict(record))
        return record

    def format_block(self, record: dict) -> str:
        """TLT's training log block for a train record."""
        lines = [f"step: {record['step']}/{record['total_steps']}",
                 f"throughput: {record['samples_per_sec']:.1f} samples/sec",
                 "==================== Metrics ====================="]
        extra = sorted(k for k in record if k.endswith("_loss") and k not in LOG_LABELS)
        for key, label in LOG_LABELS.items():
            if key in record:
                lines.append(f"{label}: {_fmt(record[key])}")
        lines += [f"{key}: {_fmt(record[key])}" for key in extra]
        return "\n".join(lines)

    @staticmethod
    def format_line(record: dict) -> str:
        """One-line summary of a train record, for notebooks."""
        parts = [f"step {record['step']}/{record['total_steps']}",
                 f"loss {record['total_loss']:.4f}"]
        short = {"rpn_total_loss": "rpn", "fast_rcnn_total_loss": "frcnn", "mask_loss": "mask",
                 "l2_loss": "l2"}
        detail = [f"{name} {record[key]:.4f}" for key, name in short.items() if key in record]
        if detail:
            parts[-1] += " (" + ", ".join(detail) + ")"
        parts.append(f"lr {record['learning_rate']:.3g}")
        parts.append(f"{record['samples_per_sec']:.1f} img/s")
        return " | ".join(parts)

    def close(self) -> None:
        """Close the progress bar and flush TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
