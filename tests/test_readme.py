"""The README's Python examples run as written (in order, in one namespace, as a reader
pasting them would), apart from the CuPy one where no GPU is present."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_example_per_entry_point():
    text = "\n".join(blocks())
    for entry in ("fo.Adam(", "fo.FlatParams(", "fastopt.torch", "fo.keras.", "cupy"):
        assert entry in text, f"README shows no example of {entry}"


def test_readme_examples_run(tmp_path):
    runnable = []
    for code in blocks():
        if "import cupy" in code:
            continue                       # needs a GPU: bench/gpu_check.sh runs the CUDA paths
        if "import torch" in code and importlib.util.find_spec("torch") is None:
            continue
        runnable.append(code)
    assert len(runnable) >= 3
    script = "\n".join(runnable)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "3"     # the Keras example's printed count
    assert (tmp_path / "ckpt.npz").exists()
