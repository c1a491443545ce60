"""The results-directory lock: a second training run on a directory in use is refused at once,
naming the holder; a lock left by a dead run is reused; the lock ends with the run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_engine import (
    fake_spec_text,  # noqa: F401  (autouse fixture: a stand-in spec text)
    make_spec,
    new_model,
    run,
)

from mrcnn_helpers.engine.lock import LOCK_NAME, ResultsLock
from mrcnn_helpers.errors import MrcnnError, TrainingError

HOLDER = """
import sys
from mrcnn_helpers.engine.lock import ResultsLock
lock = ResultsLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path / "results"."""
    results = tmp_path / "results"
    results.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(results)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield results, proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_second_run_is_refused_naming_the_holder(holder):
    results, proc = holder
    before = sorted(p.name for p in results.iterdir())
    with pytest.raises(TrainingError) as info:
        run(make_spec(), results, max_steps=2)
    message = str(info.value)
    assert isinstance(info.value, MrcnnError)
    assert f"{results} is in use by another training run (pid {proc.pid} " in message
    assert "use another results directory" in message and "has exited" not in message
    assert sorted(p.name for p in results.iterdir()) == before == [LOCK_NAME]
    assert (results / LOCK_NAME).read_text() == f"{proc.pid}\n"

    proc.stdin.close()  # the holder exits: its lock goes with it
    proc.wait(timeout=30)
    assert run(make_spec(), results, max_steps=2)["step"] == 2


def test_a_stale_lock_file_is_reused_and_the_lock_ends_with_the_run(tmp_path):
    (tmp_path / LOCK_NAME).write_text("999999999\n")  # left by a run that was killed
    assert run(make_spec(), tmp_path, max_steps=2)["step"] == 2
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    # Released after a run that returned and after one that failed.
    with ResultsLock(tmp_path):
        pass
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        run(make_spec(), tmp_path, model=new_model(nan_at_call=1))
    with ResultsLock(tmp_path):
        pass


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with ResultsLock(tmp_path), pytest.raises(TrainingError, match=f"pid {os.getpid()} "):
        ResultsLock(tmp_path).acquire()
    ResultsLock(tmp_path).acquire().release()
