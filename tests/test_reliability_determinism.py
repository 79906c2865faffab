"""Determinism: the same inputs give the same bits, whatever the threads, mode or process.

Optimizers with tensors spanning several 65536-element chunks so the parallel loop
really splits: params and every state array must be bit-identical between this process
and fresh interpreters (other hash seeds, other thread counts). The global norm
(fixed-order float64 chunk partials) must be bit-identical across thread counts and
layouts for every norm type. Every optimizer for 1 and 2 Numba threads, in list and
FlatParams mode, with and without fused clipping: tests/test_database.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastopt as fo

from reliability_cases import ALL_BY_NAME, STATS

TESTS = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(2 * 65536 + 4099,), (33, 17), (), (0, 4), (5,), (65536,)]
N_STEPS = 4

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="needs 2 Numba threads")


class threads:
    """``with threads(n):`` run Numba's parallel loops on n threads, then restore."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = numba.get_num_threads()
        numba.set_num_threads(self.n)

    def __exit__(self, *exc):
        numba.set_num_threads(self.old)


def train(name, mode, dtype, seed, clip=None):
    """A short run: {label: bytes} of every param and state array afterwards."""
    case = ALL_BY_NAME[name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(N_STEPS)]
    if mode == "flat":
        flat = fo.FlatParams(init)
        params, opt = flat.params, case.fo_cls(flat, max_grad_norm=clip, **case.hp())
    else:
        flat, params = None, init
        opt = case.fo_cls(params, max_grad_norm=clip, **case.hp())
    for g in grads:
        if flat is None:
            assert opt.step(g)
        else:
            for dst, src in zip(flat.grads, g):
                dst[...] = src
            assert opt.step()
    out = {f"param{i}": p.tobytes() for i, p in enumerate(params)}
    for i, st in opt.state.items():
        for k, v in st.items():
            out[f"state{i}.{k}"] = np.asarray(v).tobytes()
    out["last_grad_norm"] = repr(opt.last_grad_norm).encode()
    return out


def digest(result: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(result):
        h.update(k.encode() + b"\0" + result[k] + b"\0")
    return h.hexdigest()


def test_runs_are_not_trivially_equal():
    """The positive control: another seed gives other bits (the comparison can fail)."""
    assert digest(train("adam", "list", np.float32, 3)) != digest(train("adam", "list", np.float32, 4))


@needs_two_threads
@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, -np.inf, 0.0, 3.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_is_bit_identical_across_threads_and_layouts(norm_type, dtype):
    rng = np.random.default_rng(11)
    shapes = [(3 * 65536 + 7,), (100, 3), (1,), (0,), (65536 * 2,), (7, 7, 7)]
    arrays = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3, s)).astype(dtype) for s in shapes]
    flat = fo.FlatParams([np.zeros(s, dtype) for s in shapes])
    for dst, src in zip(flat.grads, arrays):
        dst[...] = src
    norms = {}
    for n in (1, 2):
        with threads(n):
            norms[n, "list"] = fo.global_norm(arrays, norm_type)
            norms[n, "flat"] = fo.global_norm(flat, norm_type)
            norms[n, "flat-views"] = fo.global_norm(flat.grads, norm_type)
    values = set(map(float.hex, map(float, norms.values())))
    assert len(values) == 1, norms
    ref = fo.global_norm(arrays, norm_type, backend="numpy")
    assert np.isclose(norms[1, "list"], ref, rtol=1e-12 if dtype == np.float64 else 1e-6), (norms, ref)


_CHILD = r"""
import json, sys
sys.path.insert(0, {tests!r})
import numba, numpy as np
from test_reliability_determinism import train, digest
out = {{}}
for name, mode, dtype, clip in json.loads(sys.argv[1]):
    out[f"{{name}}/{{mode}}/{{dtype}}/{{clip}}"] = digest(train(name, mode, np.dtype(dtype), 3, clip))
print(json.dumps({{"threads": numba.get_num_threads(), "digests": out}}))
"""

_PROCESS_RUNS = [(name, mode, dtype, clip) for name in ("adam", "nadam", "lamb", "sgd")
                 for mode, dtype, clip in (("list", "float32", None), ("flat", "float64", 0.5))]


@pytest.mark.parametrize("env", [{"NUMBA_NUM_THREADS": "1", "PYTHONHASHSEED": "1"},
                                 {"PYTHONHASHSEED": "12345"}], ids=["1-thread", "default-threads"])
def test_fresh_processes_give_the_same_bits(env):
    expected = {f"{n}/{m}/{d}/{c}": digest(train(n, m, np.dtype(d), 3, c)) for n, m, d, c in _PROCESS_RUNS}
    child_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=TESTS), json.dumps(_PROCESS_RUNS)],
                          env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "NUMBA_NUM_THREADS" in env:
        assert got["threads"] == 1
    assert got["digests"] == expected
    STATS["determinism_runs"] += len(expected)
