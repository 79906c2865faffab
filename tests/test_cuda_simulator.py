"""The CUDA kernels under Numba's CUDA simulator, as part of the one test command.

The simulator replaces ``numba.cuda`` for the whole process (``NUMBA_ENABLE_CUDASIM=1``
is read when Numba is imported), which would make the ``cuda`` backend look available
to every other test. So the CUDA test files run here in a child process of their own:
the kernels run on the CPU with NumPy arrays standing in for device memory. On a GPU
machine the same files also run for real in this process (``bench/gpu_check.sh``).

The simulator runs kernels as Python, so it cannot tell whether they compile for a GPU.
Where the CUDA toolkit's NVVM is installed, a second child process compiles the
generated kernels to PTX with the real CUDA target (no GPU needed).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = ["test_cuda_sim.py", "test_family_cudasim.py", "test_cuda_columns_sim.py",
         "test_cuda_lowbit_sim.py", "test_cuda_pure16_sim.py", "test_cuda_lowbit_reduce_sim.py",
         "test_cuda_lowbit_lamb_lars_sim.py"]
UNDER_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _under_the_simulator(args, at_least):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=-rfE", *args]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"CUDA simulator run failed:\n{out[-8000:]}"
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # Every test ran: a run that skipped them all would pass with nothing tested.
    assert passed and int(passed.group(1)) >= at_least, summary
    assert "failed" not in summary and "error" not in summary, summary
    print(summary)


@pytest.mark.skipif(UNDER_SIMULATOR, reason="already under the simulator: the files run directly")
def test_cuda_kernels_under_the_simulator():
    _under_the_simulator([str(HERE / f) for f in FILES], 180)


@pytest.mark.skipif(UNDER_SIMULATOR, reason="already under the simulator: the file runs directly")
@pytest.mark.skipif(not (HERE / "test_database.py").exists(), reason="no optimizer database")
def test_optimizer_database_on_the_cuda_backend_under_the_simulator():
    """Every optimizer of the database through the front end on backend 'cuda'."""
    _under_the_simulator([str(HERE / "test_database.py"), "-k", "cuda"], 50)


# The optimizers beyond one fused pass (or with their own oracle files): their CUDA tests.
NEW_OPTIMIZER_FILES = ["test_adafactor.py", "test_muon.py", "test_ademamix.py", "test_sparse_adam.py",
                       "test_lookahead.py", "test_schedulefree.py", "test_rprop_asgd.py"]


@pytest.mark.skipif(UNDER_SIMULATOR, reason="already under the simulator: the files run directly")
def test_new_optimizers_cuda_paths_under_the_simulator():
    """Adafactor, Muon, AdEMAMix, SparseAdam, Lookahead, schedule-free, Rprop and ASGD on
    backend 'cuda' against their references and oracles. Left out here, for the CI's time
    (the simulator runs each GPU thread in Python): Adafactor's 100-step run (80 s), and
    the float64 rows of Muon and of Rprop's and ASGD's 120-step torch runs (their float32
    rows run the same kernels for 120 steps; tests/test_database.py's cuda rows step
    Rprop and ASGD in float64 on every grid row); a GPU runs them all."""
    files = [str(HERE / f) for f in NEW_OPTIMIZER_FILES if (HERE / f).exists()]
    _under_the_simulator([*files, "-k", "cuda and not 100_steps and not (test_muon and f64) "
                                        "and not (test_rprop_asgd and matches_torch and f64)"], 50)


# Compiles kernels of every kind and column description for compute capability 9.0, and
# checks that numba's disk cache (FASTOPT_CUDA_CACHE=1) locates a generated kernel's file.
# Numba asks the current device for its compute capability when it compiles a device
# function called from a kernel; there is none here, so the child says 9.0 itself.
_PTX = textwrap.dedent("""
    import os
    import types
    import numpy as np
    import numba
    from numba import cuda, typeof
    import numba.cuda.dispatcher
    if not hasattr(numba.cuda.dispatcher, "get_current_device"):
        raise SystemExit("SKIP: this numba.cuda asks for the device elsewhere")
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from fastopt.kernels import adam, cuda as driver, lamb
    from fastopt.kernels.layout import Layout

    U16 = numba.uint16[::1]

    def spans(layout, dtype):
        native = dtype[::1]
        grad = U16 if layout.model else native
        states = [(native if f == "native" else U16) if r else grad
                  for r, f in zip(layout.reads, layout.formats)]
        return [U16 if layout.pure else native, grad] + states + [U16 if layout.extra_columns else grad]

    def ptx(kernel, layout, h, tail, dtype=numba.float32):
        text, _ = cuda.compile_ptx(kernel.py_func, (*spans(layout, dtype), *tail(typeof(h))),
                                   cc=(9, 0))
        return text

    def step(h, row_values=(), dtype=numba.float32):
        return lambda th: (numba.int64[:, ::1], th, dtype, typeof(row_values), numba.int64)

    adam_group = {**{x.name: x.default for x in adam.SPEC.hypers},
                  "lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "decoupled_weight_decay": True}
    h = adam.adam_scalars(adam_group, 3, np.float32)
    hl = lamb.lamb_scalars(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, eps_root=0.0,
                                weight_decay=0.01), 3, np.float32)
    cases = [
        ("step", Layout.of((True, True, True)), adam.adam_element, h, step(h)),
        ("step bf16/f16 state, stochastic bf16 model",
         Layout.of((True, True, False), formats=("bfloat16", "float16", "native"),
                   model="bfloat16-stochastic"), adam.adam_element, h, step(h)),
        ("step f16 model, f16/bf16 state", Layout.of((True, False, True), formats=(
            "float16", "native", "bfloat16"), model="float16"), adam.adam_element, h, step(h)),
        ("step pure bf16 params, Kahan, bf16 state", Layout.of((True, True, False), formats=(
            "bfloat16", "native", "native"), model="pure-bfloat16-kahan"), adam.adam_element, h, step(h)),
        ("step pure f16 params, Kahan", Layout.of((True, True, True), model="pure-float16-kahan"),
         adam.adam_element, h, step(h)),
        ("step pure bf16 params, stochastic", Layout.of((True, True, False),
                                                        model="pure-bfloat16-stochastic"),
         adam.adam_element, h, step(h)),
        ("step row slot", Layout.of((True, True, False), (False, False, False), row_mode=2,
                                    row_slot=2), lamb.lamb_element, hl,
         step(hl, np.zeros(2, np.float32))),
    ]
    for name, layout, fn, hh, tail in cases:
        text = ptx(driver.step_kernel(fn, layout, hh), layout, hh, tail)
        assert "call.uni" not in text and "call " not in text, name + ": a call left in"
        print("ok", name, len(text))
    # float64 math with 16-bit state: stored through float32 (the documented double rounding)
    h64 = adam.adam_scalars(adam_group, 3, np.float64)
    layout = Layout.of((True, True, True), formats=("bfloat16", "float16", "native"))
    ptx(driver.step_kernel(adam.adam_element, layout, h64), layout, h64,
        step(h64, dtype=numba.float64), numba.float64)
    print("ok float64 with 16-bit state")
    layout = Layout.of((True, True, False), (True, True, False), formats=("bfloat16", "native", "native"))
    text = ptx(driver.reduce_kernel(lamb.lamb_moments, layout, hl, write_p=False), layout, hl,
               lambda th: (numba.int64[:, ::1], th, numba.float64[:, ::1]))
    print("ok reduce", len(text))
    layout = Layout.of((True, False, True), formats=("float16", "native", "native"))
    text = ptx(driver.rows_kernel(adam.adam_element, layout, h), layout, h,
               lambda th: (numba.int32[::1], numba.int64, th, numba.float32))
    print("ok rows", len(text))
    # Frozen flags are constants: the kernel never loads Adam's five bool fields.
    layout = Layout.of((True, True, True))
    frozen = ptx(driver.step_kernel(adam.adam_element, layout, h), layout, h, step(h))
    assert frozen.count("ld.param.u8") == 0, frozen.count("ld.param.u8")
    driver.PAIR = True
    paired = ptx(driver.step_kernel(adam.adam_element, layout, h), layout, h, step(h))
    assert paired != frozen
    # FASTOPT_CUDA_CACHE=1: numba caches the kernel beside its generated source file.
    os.environ["FASTOPT_CUDA_CACHE"] = "1"
    cached = driver.step_kernel(adam.adam_element, Layout.of((True, False, False)), h)
    assert cached._cache._cache_path.startswith(os.path.dirname(cached.fastopt_source)), (
        cached._cache._cache_path, cached.fastopt_source)
    print("PTX OK")
""")


def _nvvm_present() -> bool:
    # numba.cuda.cudadrv.nvvm finds the library from CUDA_HOME, conda or /usr/local/cuda.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return any(any(Path(home, sub).glob("libnvvm.so*")) for sub in ("nvvm/lib64", "lib", "lib64"))


@pytest.mark.skipif(UNDER_SIMULATOR, reason="the simulator replaces the CUDA target")
@pytest.mark.skipif(not _nvvm_present(), reason="no CUDA toolkit (libnvvm) to compile PTX with")
def test_generated_kernels_compile_for_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", _PTX], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if "SKIP:" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and "PTX OK" in proc.stdout, out[-8000:]
