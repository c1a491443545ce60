"""The Triton kernels (model/kernels/) against the ops they replace, on the CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels' own code on the CPU; it must be set
before the kernels are compiled, so the checks in tests/interpreted/kernel_checks.py run in a
process of their own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
CHECKS = Path(__file__).parent / "interpreted" / "kernel_checks.py"


def test_kernels_match_the_ops_they_replace():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, str(CHECKS)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "20 passed" in proc.stdout
