"""Run artefacts beside the checkpoints: results.csv, model.best.pth + best.json, model.weights.pth.

- `results.csv`: one row per log and per evaluation (step, event, time, losses, lr, img/s, AP
  metrics). Its header is fixed when the file is created, so rows appended by later runs stay
  aligned; a resumed run first drops the rows past its checkpoint (written by the run that was
  killed), so the file always describes the run that the checkpoints continue.
- `model.best.pth`: after each evaluation whose mask_AP (AP for a model without masks) is the best
  so far, a second name (hard link, else an atomic copy) of that step's checkpoint; `best.json`
  names its step, the score and the metrics.
- `results.png`: the curves of results.csv (losses, learning rate, img/s, AP), drawn by
  engine.results_plot.ResultsPlot.
- `model.weights.pth`: the fp16 inference weights (checkpoint.save_inference_weights) of the best
  checkpoint, or of the newest one while no evaluation has produced a score (or when the run does
  not evaluate at all).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from mrcnn_helpers.engine.checkpoint import (
    BEST_CHECKPOINT,
    BEST_METRICS,
    INFERENCE_WEIGHTS,
    checkpoint_path,
    save_inference_weights,
)
from mrcnn_helpers.engine.hooks import HookBase
from mrcnn_helpers.errors import CheckpointError, TrainingError
from mrcnn_helpers.fileio import (
    _fsync_dir,
    atomic_output,
    atomic_write,
    atomic_write_json,
    describe_os_error,
    temporary_pattern,
)

RESULTS_CSV = "results.csv"
_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AP_COLUMNS = _AP_NAMES + tuple("mask_" + name for name in _AP_NAMES)
BASE_COLUMNS = (
    "step", "event", "time", "total_loss", "rpn_total_loss", "fast_rcnn_total_loss", "mask_loss",
    "rpn_score_loss", "rpn_box_loss", "fast_rcnn_class_loss", "fast_rcnn_box_loss", "l2_loss",
    "learning_rate", "samples_per_sec",
) + AP_COLUMNS
# Train-record keys that are no columns (the time left, the schedule length).
_NOT_COLUMNS = ("total_steps", "eta_seconds")


def _cell(key: str, value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "" if value is None else str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # pycocotools' -1 (undefined AP) and NaN are empty cells.
        if not math.isfinite(value) or (key in AP_COLUMNS and value == -1.0):
            return ""
        return repr(value)
    return str(value)


class ResultsCsv(HookBase):
    """Appends every train and eval record to `path` as a CSV row.

    resume_step: the step training continues from; rows past it are dropped before appending (all
    rows on a fresh start), and so is an eval row of that step when `drop_eval` (its evaluation
    is redone), as is a last line cut short by a killed run. Columns: BASE_COLUMNS plus any other
    loss term of the first train record; a key the header lacks is left out.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int, drop_eval: bool = False):
        self.path = Path(path)
        self.resume_step = int(resume_step)
        self.drop_eval = drop_eval
        self.header: list[str] | None = None
        self.handle = None

    def before_train(self) -> None:
        if self.path.is_file():
            self._drop_rows_past_resume()
        try:
            self.handle = open(self.path, "a", encoding="utf-8", newline="")
        except OSError as exc:
            raise TrainingError(f"cannot open {self.path}: {describe_os_error(exc)}") from None

    def _keep(self, row: dict) -> bool:
        try:
            step = int(row["step"])
        except (TypeError, ValueError):
            return False
        if step == self.resume_step and row.get("event") == "eval":
            return not self.drop_eval
        return step <= self.resume_step

    def _drop_rows_past_resume(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
        rows = list(csv.reader(io.StringIO(complete)))
        if not rows:
            return
        self.header = rows[0]
        kept = [r for r in rows[1:]
                if len(r) == len(self.header) and self._keep(dict(zip(self.header, r)))]
        if len(kept) == len(rows) - 1 and complete == text:
            return
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([self.header] + kept)
        atomic_write(self.path, out.getvalue(), error=TrainingError)

    def on_record(self, record: dict) -> None:
        if record.get("event") not in ("train", "eval") or self.handle is None:
            return
        writer = csv.writer(self.handle, lineterminator="\n")
        if self.header is None:
            extra = sorted(k for k in record if k not in BASE_COLUMNS and k not in _NOT_COLUMNS
                           and record["event"] == "train")
            self.header = list(BASE_COLUMNS) + extra
            writer.writerow(self.header)
        values = dict(record, time=datetime.datetime.now().isoformat(timespec="seconds"))
        writer.writerow([_cell(key, values.get(key)) for key in self.header])
        self.handle.flush()

    def after_train(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def link_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make `target` (e.g. model.best.pth) a second name of checkpoint `source`, atomically.

    A hard link costs no space and survives the pruning of `source`; where the file system has
    none (or across file systems) the bytes are copied through fileio.atomic_output. Either way
    `target` is replaced in one rename: a reader sees the old file or the new one. Raises
    CheckpointError naming both paths.
    """
    source, target = Path(source), Path(target)
    temporary = target.with_name(temporary_pattern(target.name).replace("*", secrets.token_hex(4)))
    try:
        os.link(source, temporary)
    except OSError:
        try:
            with open(source, "rb") as src, atomic_output(
                    target, "wb", error=CheckpointError, what="checkpoint copy") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as exc:
            raise CheckpointError(f"could not copy {source} to {target}: "
                                  f"{describe_os_error(exc)}") from exc
        return target
    try:
        os.replace(temporary, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"could not link {target} to {source}: "
                              f"{describe_os_error(exc)}; the previous file, if any, is unchanged"
                              ) from exc
    return target


def score_of(metrics: dict) -> tuple[str, float | None]:
    """(name, value) of the metric that ranks evaluations: mask_AP, else AP. The value is None
    when missing, not a number, NaN or pycocotools' -1."""
    name = "mask_AP" if "mask_AP" in metrics else "AP"
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return name, None
    value = float(value)
    return name, value if math.isfinite(value) and value != -1.0 else None


def read_best(results_dir: str | os.PathLike) -> dict | None:
    """The contents of RESULTS_DIR/best.json, or None when there is none (or it is unreadable)."""
    path = Path(results_dir) / BEST_METRICS
    try:
        with open(path, encoding="utf-8") as handle:
            best = json.load(handle)
    except (OSError, ValueError):
        return None
    if not (isinstance(best, dict) and isinstance(best.get("step"), int)
            and isinstance(best.get("value"), (int, float))):
        return None
    return best


class BestCheckpointer(HookBase):
    """Keeps model.best.pth, best.json and model.weights.pth up to date (see the module doc).

    follows_evaluation: the run evaluates, so the weights file follows the best evaluation once
    there is one. A best.json of a step past the resume step (from a timeline that was lost with
    an unreadable checkpoint) is not taken as the best so far.
    """

    def __init__(self, results_dir: str | os.PathLike, *, follows_evaluation: bool,
                 start_step: int):
        self.results_dir = Path(results_dir)
        self.follows_evaluation = follows_evaluation
        best = read_best(results_dir)
        self.best = best if best is not None and best["step"] <= start_step else None

    def on_record(self, record: dict) -> None:
        event = record.get("event")
        if event == "checkpoint" and (not self.follows_evaluation or self.best is None):
            self._write_weights()
        elif event == "eval":
            name, value = score_of(record)
            step = record["step"]
            if value is None or self.trainer.last_checkpoint != checkpoint_path(self.results_dir,
                                                                                step):
                return
            best = self.best
            if best is None or value > best["value"] or best["step"] == step:
                self._promote(step, name, value)

    def _write_weights(self) -> None:
        save_inference_weights(self.results_dir / INFERENCE_WEIGHTS,
                               self.trainer.inference_state())

    def _promote(self, step: int, name: str, value: float) -> None:
        # best.json goes last: it is what a resumed run trusts, so a run stopped half-way through
        # promotes this step again when it evaluates it again.
        link_checkpoint(checkpoint_path(self.results_dir, step),
                        self.results_dir / BEST_CHECKPOINT)
        self._write_weights()
        self.best = {"step": int(step), "checkpoint": checkpoint_path(".", step).name,
                     "metric": name, "value": value, "metrics": self.trainer.metrics}
        atomic_write_json(self.results_dir / BEST_METRICS, self.best)
