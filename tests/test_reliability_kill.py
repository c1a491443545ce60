"""Fault injection: `mrcnn train` killed with SIGKILL again and again, resumed each time.

A seeded plan of 14 kills is played against training runs: at random delays after a process
starts, at random delays after its first training step, the instant a checkpoint's temporary
file appears (inside the write), and when the evaluation after a checkpoint begins. Each killed
process is followed by a new one on the same results directory (a resume); a run that completes
before the next kill's moment comes is checked and the plan goes on with a fresh directory.
After every kill each checkpoint on disk must load with torch.load(weights_only=True); every
finished run must equal an uninterrupted one bit for bit, weights, optimizer state, RNG state
and all evaluations. Bit-exact is possible because checkpoints fall on epoch boundaries (4
training images, batch 2, a checkpoint every 2 steps), where a resume restores everything
(see engine/trainer.py), and n_workers 0 keeps the augmentation on the restored RNG."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synthetic_workdir
from test_pipeline import TINY_SPEC, mrcnn

TOTAL_STEPS = 12
EVAL_EVERY = 2  # = train images / train_batch_size: every checkpoint is at an epoch boundary
KILL_SPEC = (TINY_SPEC
             .replace("total_steps: 6", f"total_steps: {TOTAL_STEPS}")
             .replace("num_steps_per_eval: 3", f"num_steps_per_eval: {EVAL_EVERY}")
             .replace('learning_rate_steps: "[5]"', 'learning_rate_steps: "[9]"')
             .replace("n_workers: 0", "n_workers: 0\n  eval_samples: 1"))
# 14 kills: how each one picks its moment (see _kill_one). Shuffled with a fixed seed.
KILL_PLAN = ["write"] * 5 + ["after_step"] * 4 + ["from_start"] * 3 + ["evaluation"] * 2
SEED = 20240917
PROCESS_LIMIT_S = 240  # a process that neither finishes nor gets killed by then has hung
# Metrics that measure time, not the model: they differ between any two runs.
TIMING_KEYS = {"eval_images_per_sec"}
# The progress line of a logged step ("step 3/12 | loss ...").
STEP_LOGGED = re.compile(r"^step \d+/\d+ \| loss", re.MULTILINE)
# Temporary files the trainer's atomic writes may leave when killed.
TRAINER_TEMPORARIES = (".model.step-", ".metrics_step-", ".spec.txt.", ".model.best.pth.",
                       ".model.weights.pth.", ".best.json.", ".results.csv.")


# The training processes are forked from a "zygote" that has imported torch, torchvision and the
# CLI once: each child then runs `mrcnn train` (cli.main) from its first line, in a process of
# its own that SIGKILL ends, without paying ~3 s of imports per kill. The zygote runs no torch op
# before forking, so every child starts from the same state as a fresh `mrcnn` process. The last
# stretch of the killed run is a real `python -m mrcnn_helpers train` process.
ZYGOTE = r"""
import json, os, sys, traceback
import torch, torchvision  # noqa: F401
from mrcnn_helpers import cli
cli.build_parser()  # imports the modules of every subcommand
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "wait":
        print(os.waitstatus_to_exitcode(os.waitpid(cmd["pid"], 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    code = 1
    try:
        os.chdir(cmd["cwd"])
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = cli.main(cmd["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class Zygote:
    """Starts `mrcnn <argv>` in forked children; `alive`, `wait` and `kill` them by pid."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, **cmd) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv: list[str], cwd: Path, log: Path) -> int:
        log.write_text("")  # exists from the start, for whoever watches it
        return self._ask(op="start", argv=argv, cwd=str(cwd), log=str(log))

    def wait(self, pid: int) -> int:
        return self._ask(op="wait", pid=pid)

    @staticmethod
    def alive(pid: int) -> bool:
        """Running (not yet exited: an exited child stays a zombie until `wait`)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _train_argv(results: Path) -> list[str]:
    return ["train", "-e", "spec.txt", "-r", str(results)]


def _temporaries(results: Path) -> list[str]:
    return sorted(p.name for p in results.glob(".*.tmp")) if results.is_dir() else []


def _checkpoint_steps(results: Path) -> list[int]:
    if not results.is_dir():
        return []
    return sorted(int(p.name[len("model.step-"):-len(".pth")])
                  for p in results.glob("model.step-*.pth"))


def _kill_one(zygote: Zygote, pid: int, kind: str, rng: random.Random, results: Path,
              log: Path) -> bool:
    """Wait for the moment `kind` names, then SIGKILL. False if the process ended first.

    from_start: a random delay in [0.05, 3] s after the start (model and data set-up, first
      steps, checkpoints); after_step: a random delay in [0, 1.5] s after its first logged step;
      write: the instant a checkpoint's temporary file exists (polled every millisecond);
      evaluation: when the evaluation that follows a checkpoint starts.
    """
    started = time.monotonic()
    delay = rng.uniform(0.05, 3.0) if kind == "from_start" else rng.uniform(0.0, 1.5)
    trigger_at = started + delay if kind == "from_start" else None
    while zygote.alive(pid):
        now = time.monotonic()
        assert now - started < PROCESS_LIMIT_S, f"training process hung ({kind} kill)"
        if kind == "write":
            fire = any(name.startswith(".model.step-") for name in _temporaries(results))
        elif kind == "evaluation":
            fire = "evaluate" in log.read_text(errors="replace")
        elif kind == "after_step":
            if trigger_at is None and STEP_LOGGED.search(log.read_text(errors="replace")):
                trigger_at = now + delay
            fire = trigger_at is not None and now >= trigger_at
        else:
            fire = now >= trigger_at
        if fire:
            os.kill(pid, signal.SIGKILL)
            assert zygote.wait(pid) == -signal.SIGKILL
            return True
        time.sleep(0.001 if kind == "write" else 0.01)
    return False


class CheckpointAudit:
    """Loads every checkpoint file it has not seen yet (by inode, size and mtime) weights-only."""

    def __init__(self):
        self.seen: dict[tuple, int] = {}

    def check(self, results: Path, spec_text: str | None) -> int:
        for path in sorted(results.glob("model.step-*.pth")):
            st = path.stat()
            key = (path.name, st.st_ino, st.st_size, st.st_mtime_ns)
            if key in self.seen:
                continue
            state = torch.load(path, map_location="cpu", weights_only=True)
            assert state["step"] == int(path.name[len("model.step-"):-len(".pth")]), path
            assert state["format"] == "mrcnn-checkpoint" and state["model"], path
            self.seen[key] = state["step"]
        for path in results.glob("metrics_step-*.json"):
            assert "AP" in json.loads(path.read_text()), path  # never half a file
        if spec_text is not None and (results / "spec.txt").exists():
            assert (results / "spec.txt").read_text() == spec_text
        return len(self.seen)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return synthetic_workdir(tmp_path_factory.mktemp("kill"), KILL_SPEC, num_train=4,
                             num_val=1, seed=3)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _csv_rows(results: Path) -> list[dict]:
    with open(results / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in ("time", "samples_per_sec")} for row in rows]


def _assert_same_as(results: Path, reference: Path, audit: CheckpointAudit, spec_text: str):
    """A finished killed run against the uninterrupted one: nothing lost, nothing differs."""
    assert _temporaries(results) == []  # stray temporaries ignored by resume, then removed
    audit.check(results, spec_text)
    assert _checkpoint_steps(results) == _checkpoint_steps(reference)
    whole = torch.load(reference / f"model.step-{TOTAL_STEPS}.pth", weights_only=True)
    resumed = torch.load(results / f"model.step-{TOTAL_STEPS}.pth", weights_only=True)
    assert whole["model"].keys() == resumed["model"].keys()
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), (results, name)
    for a, b in zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), results
    assert torch.equal(whole["rng"]["torch"], resumed["rng"]["torch"]), results
    # The run's artefacts agree too: results.csv (rows of killed stretches dropped on resume,
    # timing columns aside), the best checkpoint and the inference weights.
    assert _csv_rows(results) == _csv_rows(reference), results
    best, best_reference = (json.loads((d / "best.json").read_text()) for d in (results, reference))
    for entry in (best, best_reference):
        entry["metrics"] = {k: v for k, v in entry["metrics"].items() if k not in TIMING_KEYS}
    assert best == best_reference, results
    for name in ("model.best.pth", "model.weights.pth"):
        got = torch.load(results / name, weights_only=True)
        expected = torch.load(reference / name, weights_only=True)
        assert got["step"] == expected["step"] == best["step"], (results, name)
        for key, tensor in expected["model"].items():
            assert torch.equal(tensor, got["model"][key]), (results, name, key)
    # Every evaluation the uninterrupted run made exists after the kills too, with equal values.
    for step in range(EVAL_EVERY, TOTAL_STEPS + 1, EVAL_EVERY):
        expected = json.loads((reference / f"metrics_step-{step}.json").read_text())
        got = json.loads((results / f"metrics_step-{step}.json").read_text())
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in expected.items() if k not in TIMING_KEYS}, (results, step)


def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(workdir, zygote):
    """Each kill of the plan lands in a run that is not finished yet: when a run completes
    before the next kill's moment comes (random delays can outlast it), that run is checked and
    the plan goes on in a fresh results directory. The last run is finished by a real
    `mrcnn train` process. Every run must equal the uninterrupted reference."""
    reference = workdir / "reference"
    pid = zygote.start(_train_argv(reference), workdir, workdir / "reference.log")
    assert zygote.wait(pid) == 0, (workdir / "reference.log").read_text()[-3000:]
    spec_text = (reference / "spec.txt").read_text()

    rng = random.Random(SEED)
    plan = list(KILL_PLAN)
    rng.shuffle(plan)
    audit = CheckpointAudit()
    runs = [workdir / "killed-0"]
    kills, mid_write, stray_seen, processes = 0, 0, set(), 0
    for kind in plan:
        left_before = set(_temporaries(runs[-1]))
        while True:
            processes += 1
            assert processes <= 3 * len(plan), "kills keep missing their moment"
            log = workdir / f"process-{processes}.log"
            pid = zygote.start(_train_argv(runs[-1]), workdir, log)
            if _kill_one(zygote, pid, kind, rng, runs[-1], log):
                break
            assert zygote.wait(pid) == 0, log.read_text()[-3000:]
            _assert_same_as(runs[-1], reference, audit, spec_text)
            runs.append(workdir / f"killed-{len(runs)}")
            left_before = set()
        kills += 1
        stray = _temporaries(runs[-1])
        if any(n.startswith(".model.step-") for n in set(stray) - left_before):
            mid_write += 1  # this kill cut a checkpoint write short
        stray_seen.update(stray)
        # Nothing but the trainer's own temporaries is ever left behind.
        assert all(n.startswith(TRAINER_TEMPORARIES) for n in stray)
        audit.check(runs[-1], spec_text)  # every checkpoint present after a kill is readable

    final = mrcnn(*_train_argv(runs[-1]), cwd=workdir)
    assert "Traceback" not in final.stderr
    _assert_same_as(runs[-1], reference, audit, spec_text)

    assert kills == len(KILL_PLAN) >= 12
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    assert stray_seen, "no kill left a temporary file to clean up"
    print(f"{kills} kills in {len(runs)} runs ({processes} processes); {mid_write} inside a "
          f"checkpoint write; {len(audit.seen)} checkpoint files loaded weights-only; "
          f"temporaries left and then removed: {sorted(stray_seen)}")


def test_temporaries_of_killed_writes_are_ignored_and_removed(tmp_path, monkeypatch, capsys):
    """What a SIGKILL inside each kind of write leaves (a checkpoint, a metrics JSON, spec.txt:
    the last two take microseconds, too short to hit on purpose, so their leftovers are made by
    hand): the resumed run ignores them and removes them."""
    from test_engine import make_spec, run

    import mrcnn_helpers.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "spec_text", lambda spec: "total_steps: 20\n")
    spec = make_spec()
    run(spec, tmp_path, max_steps=6)
    half = (tmp_path / "model.step-6.pth").read_bytes()
    leftovers = {".model.step-12.pth.k1ll3d.tmp": half[: len(half) // 2],
                 ".metrics_step-12.json.k1ll3d.tmp": b'{"AP": 0.',
                 ".spec.txt.k1ll3d.tmp": b"total_st"}
    for name, data in leftovers.items():
        (tmp_path / name).write_bytes(data)
    capsys.readouterr()
    result = run(spec, tmp_path)
    assert f"Resuming from {tmp_path / 'model.step-6.pth'} at step 6" in capsys.readouterr().out
    assert result["step"] == 20
    assert _temporaries(tmp_path) == []
    assert (tmp_path / "spec.txt").read_text() == "total_steps: 20\n"
    assert json.loads((tmp_path / "metrics_step-12.json").read_text())["AP"] > 0
