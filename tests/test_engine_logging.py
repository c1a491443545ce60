"""What a training run prints and logs (CPU): one line per log with progress and ETA, TLT's
blocks on request and always in train.log, evaluations in one line, printed once, no bar junk
outside a terminal."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import (
    FakeLoader,
    fake_evaluate,
    fake_spec_text,  # noqa: F401  (autouse fixture: a stand-in spec text)
    make_spec,
    run,
)

from mrcnn_helpers.engine import train
from mrcnn_helpers.engine.logging import (
    format_eval_block,
    format_eval_line,
    format_line,
    format_metric_value,
    train_record,
)

TESTS = Path(__file__).parent
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| "


def _record(**overrides):
    averages = {"rpn_score_loss": 0.5, "rpn_box_loss": 0.25, "fast_rcnn_class_loss": 0.125,
                "fast_rcnn_box_loss": 0.0625, "mask_loss": 1.0}
    record = train_record(400, 2500, averages, samples_per_sec=96.4, learning_rate=0.01,
                          l2_loss=0.5, eta_seconds=455.2)
    record.update(overrides)
    return record


def test_the_progress_line():
    line = format_line(_record())
    assert line == ("step 400/2500 | loss 2.4375 (rpn 0.7500, frcnn 0.1875, mask 1.0000, l2 "
                    "0.5000) | lr 0.01 | 96.4 img/s | 16% ETA 0:07:35")
    assert format_line(_record(eta_seconds=None)).endswith("16% ETA ?")
    assert format_line({**_record(), "step": 2500}).endswith("100% ETA 0:07:35")


def test_metric_values_are_never_minus_one_and_integers_stay_integers():
    assert format_metric_value(-1.0) == "n/a" and format_metric_value(None) == "n/a"
    assert format_metric_value(float("nan")) == "n/a" and format_metric_value(12) == "12"
    assert format_metric_value(0.25) == "0.250000000" and format_metric_value(0.25, 4) == "0.2500"
    record = {"event": "eval", "step": 6, "AP": 0.5, "AP50": -1.0, "mask_AP": 0.25,
              "mask_AP50": 0.75, "eval_images": 4}
    assert format_eval_line(record, 20) == \
        "step 6/20 eval: AP 0.5000, AP50 n/a, mask_AP 0.2500, mask_AP50 0.7500"
    block = format_eval_block(record)
    assert "AP50: n/a" in block and "eval_images: 4" in block and "-1.0" not in block


def test_default_output_is_one_line_per_log_and_train_log_has_everything(tmp_path, capsys):
    run(make_spec(), tmp_path, verbose=False)
    out = capsys.readouterr().out
    logs = [line for line in out.splitlines() if re.match(r"step \d+/20 \| loss", line)]
    assert [line.split(" |")[0] for line in logs] == ["step 5/20", "step 10/20", "step 15/20",
                                                      "step 20/20"]
    assert all(re.search(r"\| \d+\.\d img/s \| \d+% ETA \d+:\d\d:\d\d$", line) for line in logs)
    assert "==== Metrics" not in out and "Total loss:" not in out
    assert "\r" not in out and "it/s" not in out and "%|" not in out  # no bar in a pipe
    # The final metrics are printed once.
    assert out.count("step 20/20 eval: AP ") == 1

    log = (tmp_path / "train.log").read_text()
    assert all(re.match(STAMP, line) for line in log.splitlines())
    assert re.search(STAMP + r"step 20/20 \| loss", log)
    assert re.search(STAMP + r"Total loss: \d", log) and log.count("throughput: ") == 4
    assert re.search(STAMP + r"step 20/20 eval: AP ", log) and "per class cat: 0.5000" in log
    assert re.search(STAMP + r"checkpoint .*model.step-20.pth", log)
    assert re.search(STAMP + "Training from step 0 of 20", log)

    # A second call on the finished run prints the same final metrics line, once.
    train(make_spec(), tmp_path, device="cpu", evaluate_fn=fake_evaluate)
    again = capsys.readouterr().out
    assert "Training is finished" in again and again.count("step 20/20 eval: AP ") == 1


@pytest.mark.parametrize("option", ["verbose", "tlt_log"])
def test_tlt_blocks_on_request(tmp_path, capsys, option):
    run(make_spec(), tmp_path, max_steps=6, **{option: True})
    out = capsys.readouterr().out
    assert "step: 5/20" in out and "Total loss: " in out and "throughput: " in out
    assert "=========== Metrics ===========" in out  # the evaluation's block too


def test_throughput_and_eta_leave_checkpoints_and_evaluations_out(tmp_path):
    def slow_evaluate(model, spec, device=None):
        time.sleep(1.0)
        return fake_evaluate(model, spec, device)

    records = []
    # Steps 7-10 follow the slow evaluation of step 6; the window of step 10 spans it.
    run(make_spec(), tmp_path, max_steps=10, on_log=records.append,
        evaluate_fn=slow_evaluate)
    window = [r for r in records if r["event"] == "train" and r["step"] == 10][0]
    # Counting the evaluation's second would give at most 5 steps x 2 images / 1 s.
    assert window["samples_per_sec"] > 20
    assert window["eta_seconds"] == pytest.approx(0.0)  # stops at 10: nothing left
    first = [r for r in records if r["event"] == "train"][0]
    assert first["eta_seconds"] == pytest.approx((10 - 5) * 2 / first["samples_per_sec"])


class _SlowFirstBatch(FakeLoader):
    """The first batch of the run takes 1.5 s, as a first step compiling kernels does."""

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == 0 and self.epoch == 0:
                time.sleep(1.5)
            yield batch


def test_the_first_step_is_left_out_of_throughput_and_eta(tmp_path, monkeypatch):
    from mrcnn_helpers.engine.logging import LoggingHook

    monkeypatch.setattr(LoggingHook, "FIRST_STEP_NOTE_S", 1.0)
    records = []
    run(make_spec(), tmp_path, max_steps=10, on_log=records.append,
        train_loader=_SlowFirstBatch(), evaluate_fn=None)
    first = next(r for r in records if r["event"] == "train")
    # With the first step counted, 5 steps x 2 images would be at most 10 / 1.5 s = 6.7 img/s.
    assert first["step"] == 5 and first["samples_per_sec"] > 20
    assert first["eta_seconds"] == pytest.approx((10 - 5) * 2 / first["samples_per_sec"])
    log = (tmp_path / "train.log").read_text()
    assert log.count("the first step took") == 1 and re.search(r"first step took 1\.\d s", log)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo terminal")
def test_on_a_terminal_the_bar_stays_below_the_lines(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_engine as t; "
            "import mrcnn_helpers.engine.trainer as m; m.spec_text = lambda s: 'x\\n'; "
            f"t.run(t.make_spec(), {str(tmp_path)!r})")
    primary, secondary = os.openpty()
    # A terminal of 24 x 120 characters (a new pseudo terminal has none, and no room for a bar).
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=secondary, stderr=secondary,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert re.search(r"train: +\d+%\|", out), out[-2000:]  # tqdm's bar
    assert "step 20/20 | loss" in out and out.count("step 20/20 eval: AP ") == 1
