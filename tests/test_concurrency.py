"""Thread and process safety: concurrent steps from Python threads, a step after fork.

Numba's workqueue threading layer aborts when two Python threads enter parallel regions
at once, and GNU OpenMP deadlocks in a forked child; fastopt pins TBB, which is safe for
both. These tests fail (or hang until their timeout) under the wrong layer.
"""
from __future__ import annotations

import multiprocessing
import threading

import numba
import numpy as np
import pytest

import fastopt as fo

from cases import BY_NAME, CASES

# Several chunks per step, so every step runs a real parallel region.
SHAPES = [(3 * 65536 + 11,), (3, 5), (1,), (0,)]
N_STEPS = 12


def _job(case, seed, mode, dtype=np.float32):
    """Build an optimizer and its gradients for one run (deterministic in its arguments)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(N_STEPS)]
    if mode == "flat":
        flat = fo.FlatParams(init)
        return flat.params, case.fo_cls(flat, backend="cpu", **case.hp()), grads, flat
    return init, case.fo_cls(init, backend="cpu", **case.hp()), grads, None


def _train(params, opt, grads, flat, barrier=None):
    if barrier is not None:
        barrier.wait(timeout=60)
    for g in grads:
        if flat is None:
            opt.step(g)
        else:
            for dst, src in zip(flat.grads, g):
                dst[...] = src
            opt.step()
    return _result(params, opt)


def _result(params, opt):
    state = {i: {k: np.array(v) for k, v in st.items()} for i, st in opt.state.items()}
    return [p.copy() for p in params], state


def _assert_identical(a, b, what):
    (pa, sa), (pb, sb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert x.tobytes() == y.tobytes(), f"{what}: params[{i}] differ"
    assert sorted(sa) == sorted(sb), what
    for i in sa:
        assert sorted(sa[i]) == sorted(sb[i]), what
        for k in sa[i]:
            assert sa[i][k].tobytes() == sb[i][k].tobytes(), f"{what}: state[{i}][{k!r}] differ"


def _specs():
    # Two runs of every optimizer (same compiled driver in two threads at once), list and
    # FlatParams mode, float32 and float64.
    return [(case, seed, mode, dtype) for case in CASES
            for seed, mode, dtype in ((0, "list", np.float32), (1, "flat", np.float64))]


def test_threads_stepping_their_own_optimizers_match_serial_runs():
    specs = _specs()
    serial = [_train(*_job(*s)) for s in specs]
    jobs = [_job(*s) for s in specs]
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list = []

    def worker(k):
        try:
            results[k] = _train(*jobs[k], barrier=barrier)
        except BaseException as exc:     # reported below; a thread must not die silently
            errors.append((k, exc))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stepping thread hung"
    assert not errors, f"threads failed: {errors}"
    for spec, r, s in zip(specs, results, serial):
        _assert_identical(r, s, f"{spec[0].name}/{spec[2]}: threaded vs serial")
    assert numba.threading_layer() == "tbb"


def test_threading_layer_is_tbb_after_a_step():
    p = [np.zeros(70000, np.float32)]
    fo.Adam(p, backend="cpu").step([np.ones(70000, np.float32)])
    assert numba.threading_layer() == "tbb"


def _child(conn, name, seed, mode):
    try:
        conn.send(("ok", _train(*_job(BY_NAME[name], seed, mode))))
    except BaseException as exc:  # pragma: no cover - reported by the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["list", "flat"])
def test_step_in_forked_child(mode):
    """The parent has stepped (TBB's pool is running) before it forks; the child steps
    and sends its results through a pipe: they equal the parent's own run."""
    case = BY_NAME["adam"]
    expected = _train(*_job(case, 5, mode))          # parent steps first
    assert numba.threading_layer() == "tbb"
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, case.name, 5, mode))
    proc.start()
    send.close()
    try:
        assert recv.poll(120), "the forked child sent nothing (deadlock after fork?)"
        status, payload = recv.recv()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", payload
    assert proc.exitcode == 0
    _assert_identical(payload, expected, "forked child vs parent")
    # The parent still steps after the fork.
    _assert_identical(_train(*_job(case, 5, mode)), expected, "parent after fork")
