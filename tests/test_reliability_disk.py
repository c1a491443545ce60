"""Fault injection: writes that fail (full disk, read-only directory) during training and output.

A full disk is simulated by a file object that writes the first bytes it is given and then
raises OSError(ENOSPC), as a real one does when the disk fills mid-file; a read-only directory
by os.replace raising OSError(EROFS) (root, as in CI, writes into a chmod 555 directory, so the
real one runs only as another user). Each time: the previous file stays intact and loadable, no
half-written or temporary file is left, and the error names the path, in one line at the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import synthetic_workdir
from test_pipeline import TINY_SPEC

from mrcnn_helpers.cli import main
from mrcnn_helpers.engine import load_checkpoint
from mrcnn_helpers.errors import CheckpointError, MrcnnError, TrainingError
from mrcnn_helpers.fileio import atomic_write

DISK_SPEC = (TINY_SPEC.replace("total_steps: 6", "total_steps: 4")
             .replace("num_steps_per_eval: 3", "num_steps_per_eval: 2")
             .replace('learning_rate_steps: "[5]"', 'learning_rate_steps: "[3]"')
             .replace("n_workers: 0", "n_workers: 0\n  eval_samples: 1"))
REAL_OPEN, REAL_FDOPEN, REAL_REPLACE = open, os.fdopen, os.replace


class FullDisk:
    """File object that accepts `room` bytes (or characters), then raises ENOSPC."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[:self._room])
            self._handle.flush()  # the bytes that fitted are on disk, as on a real full disk
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _fill_disk_for(monkeypatch, prefix: str, room: int = 1000) -> list[str]:
    """Make os.fdopen / open of files whose name starts with `prefix` hit a full disk.

    Returns the list the names of the files that failed are appended to.
    """
    hit = []

    def fdopen(fd, *args, **kwargs):
        handle = REAL_FDOPEN(fd, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(prefix):
            hit.append(name)
            return FullDisk(handle, room)
        return handle

    def open_(file, *args, **kwargs):
        handle = REAL_OPEN(file, *args, **kwargs)
        if not isinstance(file, int) and os.path.basename(os.fspath(file)).startswith(prefix):
            hit.append(os.path.basename(os.fspath(file)))
            return FullDisk(handle, room)
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr("builtins.open", open_)
    return hit


def _read_only_for(monkeypatch, prefix: str) -> list[str]:
    """Make os.replace onto a name starting with `prefix` fail as on a read-only file system."""
    hit = []

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)).startswith(prefix):
            hit.append(os.path.basename(os.fspath(dst)))
            raise OSError(errno.EROFS, "Read-only file system")
        return REAL_REPLACE(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return hit


def cli_error(capsys, *argv) -> str:
    """Run `mrcnn ARGV` in this process; assert exit 2 and one `error:` line; return it."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1
    return lines[-1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return synthetic_workdir(tmp_path_factory.mktemp("disk"), DISK_SPEC, num_train=4,
                             num_val=1, seed=5)


@pytest.fixture(scope="module")
def trained(workdir):
    """A results directory stopped at step 2 (checkpoint, metrics and spec.txt written)."""
    results = workdir / "base"
    assert main(["train", "-e", str(workdir / "spec.txt"), "-r", str(results),
                 "--max-steps", "2"]) == 0
    return results


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.is_file():
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_checkpoint_write_fails_then_run_resumes(workdir, trained, tmp_path, monkeypatch,
                                                 capsys, fault):
    results = _copy(trained, tmp_path / "results")
    before = _digest(results / "model.step-2.pth")
    if fault == "disk full":
        hit = _fill_disk_for(monkeypatch, ".model.step-4.pth", room=1 << 20)
        reason = "No space left on device (errno 28)"
    else:
        hit = _read_only_for(monkeypatch, "model.step-4.pth")
        reason = "Read-only file system (errno 30)"
    line = cli_error(capsys, "train", "-e", str(workdir / "spec.txt"), "-r", str(results))
    monkeypatch.undo()
    assert hit, "the fault was not injected"
    assert line == (f"error: could not write checkpoint {results / 'model.step-4.pth'}: {reason}; "
                    "the previous checkpoint, if any, is unchanged")
    assert _digest(results / "model.step-2.pth") == before
    assert load_checkpoint(results / "model.step-2.pth")["step"] == 2
    assert not (results / "model.step-4.pth").exists() and _leftovers(results) == []

    # Space freed: the same command resumes from step 2 and finishes.
    assert main(["train", "-e", str(workdir / "spec.txt"), "-r", str(results)]) == 0
    assert "Resuming from" in capsys.readouterr().out
    assert torch.load(results / "model.step-4.pth", weights_only=True)["step"] == 4
    assert json.loads((results / "metrics_step-4.json").read_text())["eval_images"] == 1


def test_metrics_write_fails_then_resume_evaluates_it(workdir, trained, tmp_path, monkeypatch,
                                                      capsys):
    results = _copy(trained, tmp_path / "results")
    hit = _fill_disk_for(monkeypatch, ".metrics_step-4.json.", room=50)
    line = cli_error(capsys, "train", "-e", str(workdir / "spec.txt"), "-r", str(results))
    monkeypatch.undo()
    assert hit
    assert line == (f"error: could not write {results / 'metrics_step-4.json'}: No space left on "
                    "device (errno 28); the previous file, if any, is unchanged")
    assert not (results / "metrics_step-4.json").exists() and _leftovers(results) == []
    assert load_checkpoint(results / "model.step-4.pth")["step"] == 4  # written before the eval

    # The checkpoint is final but unevaluated: the next run evaluates it instead of saying
    # "finished" with the metrics missing.
    assert main(["train", "-e", str(workdir / "spec.txt"), "-r", str(results)]) == 0
    out = capsys.readouterr().out
    assert "evaluating it first" in out and "step 4/4 eval" in out
    assert json.loads((results / "metrics_step-4.json").read_text())["eval_images"] == 1
    assert main(["train", "-e", str(workdir / "spec.txt"), "-r", str(results)]) == 0
    assert "Training is finished" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_spec_and_metrics_files_are_never_half_written(tmp_path, monkeypatch, fault):
    target = tmp_path / "spec.txt"
    target.write_text("old contents\n")
    if fault == "disk full":
        hit = _fill_disk_for(monkeypatch, ".spec.txt.", room=5)
    else:
        hit = _read_only_for(monkeypatch, "spec.txt")
    with pytest.raises(TrainingError, match=f"could not write {target}: "):
        atomic_write(target, "new contents, longer than the room left\n", error=TrainingError)
    monkeypatch.undo()
    assert hit and target.read_text() == "old contents\n" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["evaluate --json", "infer --json"])
def test_json_outputs_are_never_half_written(tmp_path, monkeypatch, writer):
    from mrcnn_helpers.evaluate import write_metrics_json
    from mrcnn_helpers.fileio import atomic_write_json

    target = tmp_path / "out.json"
    target.write_text('{"old": 1}')
    hit = _fill_disk_for(monkeypatch, ".out.json.", room=10)
    with pytest.raises(MrcnnError, match=f"could not write {target}: No space left on device"):
        if writer == "evaluate --json":
            write_metrics_json({"AP": 0.5, "per_class": {"a": 0.25}}, target)
        else:
            atomic_write_json(target, [{"image_id": 0, "score": 0.5}] * 20)
    monkeypatch.undo()
    assert hit and json.loads(target.read_text()) == {"old": 1} and _leftovers(tmp_path) == []


def test_evaluate_json_on_full_disk_is_one_line(workdir, trained, monkeypatch, capsys):
    out = workdir / "metrics.json"
    _fill_disk_for(monkeypatch, ".metrics.json.", room=10)
    line = cli_error(capsys, "evaluate", "-m", str(trained), "--json", str(out))
    monkeypatch.undo()
    assert line.startswith(f"error: could not write {out}: No space left on device")
    assert not out.exists() and _leftovers(workdir) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 directory; the "
                    "read-only case is simulated above with os.replace failing (EROFS)")
def test_truly_read_only_results_directory(workdir, trained, tmp_path, capsys):
    results = _copy(trained, tmp_path / "results")
    before = _digest(results / "model.step-2.pth")
    results.chmod(0o555)
    try:
        line = cli_error(capsys, "train", "-e", str(workdir / "spec.txt"), "-r", str(results))
    finally:
        results.chmod(0o755)
    assert str(results) in line and "Permission denied" in line
    assert _digest(results / "model.step-2.pth") == before


def test_checkpoint_error_names_the_path_for_any_failure(tmp_path, monkeypatch):
    """save_checkpoint's error for a full disk met by torch's own writer (a RuntimeError)."""
    from mrcnn_helpers.engine import save_checkpoint

    path = save_checkpoint(tmp_path / "model.step-1.pth",
                           {"format": "mrcnn-checkpoint", "version": 1, "step": 1,
                            "model": {"w": torch.zeros(4)}})
    _fill_disk_for(monkeypatch, ".model.step-1.pth", room=100)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {path}: No space"):
        save_checkpoint(path, {"format": "mrcnn-checkpoint", "version": 1, "step": 1,
                               "model": {"w": torch.ones(1 << 16)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(4))
    assert _leftovers(tmp_path) == []


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """Temporary files are private (mkstemp: 0600); the published file has open()'s mode (0666
    less the process's umask), so results can be read by other users and containers."""
    from mrcnn_helpers.fileio import PendingFile, atomic_write

    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert expected != 0o600  # the check below tells the two apart
    written = atomic_write(tmp_path / "a.json", "{}")
    pending = PendingFile(tmp_path / "clip.avi")
    pending.tmp.write_bytes(b"x")
    video = pending.commit()
    assert oct(written.stat().st_mode & 0o777) == oct(expected)
    assert oct(video.stat().st_mode & 0o777) == oct(expected)
