"""The CUDA kernels under Numba's CUDA simulator, as part of the one test command.

The simulator replaces ``numba.cuda`` for the whole process (``NUMBA_ENABLE_CUDASIM=1``
is read when Numba is imported), which would make the ``cuda`` backend look available
to every other test. So the CUDA test files run here in a child process of their own:
the kernels run on the CPU with NumPy arrays standing in for device memory. On a GPU
machine the same files also run for real in this process (``bench/gpu_check.sh``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = ["test_cuda_sim.py", "test_family_cudasim.py"]


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="already under the simulator: the files run directly")
def test_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=-rfE", *(str(HERE / f) for f in FILES)]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"CUDA simulator run failed:\n{out[-8000:]}"
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # Every kernel test ran: a run that skipped them all would pass with nothing tested.
    assert passed and int(passed.group(1)) >= 100, summary
    assert "failed" not in summary and "error" not in summary, summary
    print(summary)
