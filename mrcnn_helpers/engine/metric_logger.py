"""MetricLogger: the trainer's reports (progress line or TLT block, TensorBoard, a callback) for
training loops of your own, fed with host-side loss values."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from mrcnn_helpers.engine.hooks import eval_record
from mrcnn_helpers.engine.logging import (
    ConsoleWriter,
    TensorBoardWriter,
    format_block,
    format_line,
    train_record,
)


class MetricLogger:
    """Averages host-side loss values over each logging window and reports them (stdout with a
    terminal-only progress bar, TensorBoard in `tensorboard_dir`, `on_log(record)`), for loops
    of your own; `train` uses the hooks above instead. Records as `train_record` / eval_record.
    """

    def __init__(self, *, total_steps: int, logging_frequency: int, batch_size: int,
                 start_step: int = 0, tensorboard_dir: str | os.PathLike | None = None,
                 verbose: bool = False, on_log: Callable[[dict], Any] | None = None,
                 rank: int = 0, progress: bool = True):
        self.total_steps = int(total_steps)
        self.logging_frequency = max(1, int(logging_frequency))
        self.batch_size = int(batch_size)
        self.on_log = on_log
        self.rank = rank
        self.console = ConsoleWriter(total_steps, start_step, blocks=verbose,
                                     progress=progress and rank == 0)
        self.tensorboard = (TensorBoardWriter(tensorboard_dir)
                            if tensorboard_dir is not None and rank == 0 else None)
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0
        self._window_start = time.perf_counter()

    def _emit(self, record: dict) -> dict:
        if self.rank == 0:
            self.console.on_record(record)
            if self.tensorboard is not None:
                self.tensorboard.on_record(record)
        if self.on_log is not None:
            self.on_log(dict(record))
        return record

    def update(self, terms: dict[str, float]) -> None:
        """Add one step's loss terms (plain floats, keyed as the model returns them)."""
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        self.console.after_step()

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
        record = train_record(step, self.total_steps,
                              {k: v / count for k, v in self._sums.items()},
                              samples_per_sec=self._count * self.batch_size / elapsed,
                              learning_rate=learning_rate, l2_loss=l2_loss)
        self._reset_window()
        return self._emit(record)

    def log_eval(self, step: int, metrics: dict, *, source: str = "") -> dict:
        """Report evaluation metrics of global step `step` (only top-level numbers are logged)."""
        record = eval_record(step, metrics)
        if self.rank == 0:
            self.console.write_eval(record, source)
            if self.tensorboard is not None:
                self.tensorboard.on_record(record)
        if self.on_log is not None:
            self.on_log(dict(record))
        return record

    format_block = staticmethod(format_block)
    format_line = staticmethod(format_line)

    def close(self) -> None:
        """Close the progress bar and flush TensorBoard."""
        self.console.after_train()
        if self.tensorboard is not None:
            self.tensorboard.after_train()
