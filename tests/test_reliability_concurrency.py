"""Concurrency: threads stepping their own optimizers, threads sharing one, fork and spawn.

- N Python threads step N optimizers at once (every optimizer, both modes, fused
  clipping and gradient scaling on): each result equals the same run made alone.
- One optimizer shared by several threads: ``Optimizer.step`` holds a lock, so the
  result equals the same steps made one after another. The order the threads got the
  lock in is recorded from inside the step (a callable lr is evaluated there) and the
  steps are replayed serially in that order: bit-identical params and state. A step
  blocks while another holds the lock; copies and pickles get their own lock.
- A step inside a forked child (the parent's TBB pool running, another thread of the
  parent stepping at the moment of the fork) and inside a ``spawn`` worker gives the
  parent's bits.
"""
from __future__ import annotations

import copy
import multiprocessing
import pickle
import threading
import time

import numba
import numpy as np
import pytest

import fastopt as fo

from reliability_cases import ALL_BY_NAME, ALL_CASES, STATS

SHAPES = [(2 * 65536 + 13,), (7, 5), (1,), (0,), ()]
N_STEPS = 6


def make_run(name, seed, mode, dtype=np.float32, **options):
    """(params, optimizer, per-step grads, FlatParams or None): deterministic in the args."""
    case = ALL_BY_NAME[name]
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(N_STEPS)]
    if mode == "flat":
        flat = fo.FlatParams(init)
        return flat.params, case.fo_cls(flat, **case.hp(), **options), grads, flat
    return init, case.fo_cls(init, **case.hp(), **options), grads, None


def one_step(opt, flat, g, grad_scale=None):
    kw = {} if grad_scale is None else {"grad_scale": grad_scale}
    if flat is None:
        return opt.step(g, **kw)
    for dst, src in zip(flat.grads, g):
        dst[...] = src
    return opt.step(**kw)


def result(params, opt):
    out = {f"param{i}": p.tobytes() for i, p in enumerate(params)}
    for i, st in opt.state.items():
        for k, v in st.items():
            out[f"state{i}.{k}"] = np.asarray(v).tobytes()
    return out


def train(name, seed, mode, barrier=None, **options):
    params, opt, grads, flat = make_run(name, seed, mode, **options)
    if barrier is not None:
        barrier.wait(timeout=60)
    for g in grads:
        assert one_step(opt, flat, g, grad_scale=0.5) is True
    return result(params, opt)


def run_threads(fns, timeout=120):
    """Run the callables in threads started together; their results, or raise."""
    results, errors = [None] * len(fns), []

    def worker(k):
        try:
            results[k] = fns[k]()
        except BaseException as exc:      # reported below; a thread must not die silently
            errors.append((k, exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, f"threads failed: {errors!r}"
    return results


# -- N threads, N optimizers -------------------------------------------------------------
def test_threads_stepping_their_own_optimizers_match_serial_runs():
    specs = [(c.name, seed, mode, dict(max_grad_norm=1.0) if seed % 2 else {})
             for c in ALL_CASES for seed, mode in ((0, "list"), (1, "flat"))]
    serial = [train(n, s, m, **o) for n, s, m, o in specs]
    barrier = threading.Barrier(len(specs))
    threaded = run_threads([lambda spec=spec: train(*spec[:3], barrier=barrier, **spec[3])
                            for spec in specs])
    for spec, a, b in zip(specs, threaded, serial):
        assert a == b, f"{spec[:3]}: threaded run differs from the run made alone"
    assert numba.threading_layer() == "tbb"
    STATS["concurrent_runs"] += len(specs)


# -- one optimizer, several threads --------------------------------------------------------
class RecordingLR:
    """A callable lr that records which thread each step was made by (inside step())."""

    def __init__(self, lr):
        self.lr = lr
        self.order: list = []

    def __call__(self, iteration):
        self.order.append((iteration, threading.current_thread().name))
        return self.lr


@pytest.mark.parametrize("name,mode", [("adam", "list"), ("lamb", "flat"), ("sgd", "flat")])
def test_shared_optimizer_equals_the_serial_replay_of_its_lock_order(name, mode):
    n_threads, per_thread = 4, 6
    case = ALL_BY_NAME[name]
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    # Each thread has its own gradients (so the order matters) and its own grad arrays.
    grads = {f"t{k}": [[rng.standard_normal(s).astype(np.float32) for s in SHAPES]
                       for _ in range(per_thread)] for k in range(n_threads)}

    def build():
        lr = RecordingLR(case.hp()["lr"])
        hp = {**case.hp(), "lr": lr}
        if mode == "flat":
            flat = fo.FlatParams(init)
            return flat.params, case.fo_cls(flat, **hp), lr, flat
        params = [a.copy() for a in init]
        return params, case.fo_cls(params, **hp), lr, None

    params, opt, lr, flat = build()
    barrier = threading.Barrier(n_threads)
    flat_lock = threading.Lock()

    def worker():
        me = threading.current_thread().name
        barrier.wait(timeout=60)
        for g in grads[me]:
            if flat is None:
                assert opt.step(g) is True
            else:
                # FlatParams mode reads flat.grads: filling them and stepping is one unit.
                with flat_lock:
                    one_step(opt, flat, g)

    threads = [threading.Thread(target=lambda: _catching(worker, errors), name=f"t{k}")
               for k in range(n_threads)]
    errors: list = []
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    order = lr.order
    assert [it for it, _ in order] == list(range(n_threads * per_thread)), order
    assert int(opt.iterations) == n_threads * per_thread
    # Replay serially in the recorded order.
    r_params, r_opt, _, r_flat = build()
    used = {name_: 0 for name_ in grads}
    for _, who in order:
        one_step(r_opt, r_flat, grads[who][used[who]])
        used[who] += 1
    assert result(params, opt) == result(r_params, r_opt), \
        "the shared optimizer's result is not that of its steps made one after another"
    STATS["shared_optimizer_steps"] += len(order)


def _catching(fn, errors):
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


def test_shared_optimizer_same_gradients_from_many_threads():
    """Heavier steps (a 2M-element tensor), the same gradient arrays from every thread:
    any serial order gives the same bits, that of n * m steps made alone."""
    n_threads, per_thread, size = 4, 5, 2_000_000
    rng = np.random.default_rng(9)
    init = rng.standard_normal(size).astype(np.float32)
    g = [rng.standard_normal(size).astype(np.float32)]
    params = [init.copy()]
    opt = fo.Adam(params, lr=1e-2, amsgrad=True)
    barrier = threading.Barrier(n_threads)

    def worker():
        barrier.wait(timeout=60)
        for _ in range(per_thread):
            assert opt.step(g) is True

    run_threads([worker] * n_threads)
    alone = [init.copy()]
    ref = fo.Adam(alone, lr=1e-2, amsgrad=True)
    for _ in range(n_threads * per_thread):
        ref.step(g)
    assert result(params, opt) == result(alone, ref)
    assert int(opt.state[0]["step"]) == n_threads * per_thread


def test_a_step_waits_while_another_holds_the_lock():
    params = [np.zeros(5, np.float32)]
    opt = fo.SGD(params, lr=1.0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (opt.step([np.ones(5, np.float32)]), done.set()))
    with opt._step_lock:
        t.start()
        assert not done.wait(0.3), "step() ran while another caller held the optimizer's lock"
        assert np.all(params[0] == 0)
    assert done.wait(30), "step() did not run after the lock was released"
    t.join(30)
    assert np.all(params[0] == -1)


def test_copies_and_pickles_get_their_own_lock():
    params = [np.ones(3, np.float32)]
    opt = fo.Adam(params)
    opt.step([np.ones(3, np.float32)])
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other._step_lock is not opt._step_lock
        with opt._step_lock:             # the original's lock held: the copy still steps
            assert other.step([np.ones(3, np.float32)]) is True
        assert int(other.state[0]["step"]) == 2 and int(opt.state[0]["step"]) == 1


# -- processes -------------------------------------------------------------------------------
def _child_train(conn, name, seed, mode):
    try:
        conn.send(("ok", train(name, seed, mode)))
    except BaseException as exc:  # pragma: no cover - reported by the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def _in_process(ctx, name, seed, mode, timeout=180):
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_train, args=(send, name, seed, mode))
    proc.start()
    send.close()
    try:
        assert recv.poll(timeout), f"the {ctx.get_start_method()} child sent nothing (deadlock?)"
        status, payload = recv.recv()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", payload
    assert proc.exitcode == 0
    return payload


def test_step_in_forked_child_while_another_thread_steps():
    """Fork while a thread of the parent is inside steps of another optimizer (the TBB
    pool busy): the child steps its own optimizer to the parent's bits."""
    expected = {mode: train("adamw", 21, mode) for mode in ("list", "flat")}
    assert numba.threading_layer() == "tbb"
    stop = threading.Event()
    busy_params = [np.zeros(3_000_000, np.float32)]
    busy = fo.Adam(busy_params)
    busy_grads = [np.ones(3_000_000, np.float32)]
    count = [0]

    def background():
        while not stop.is_set():
            busy.step(busy_grads)
            count[0] += 1

    t = threading.Thread(target=background)
    t.start()
    try:
        while count[0] < 2:
            time.sleep(0.01)
        ctx = multiprocessing.get_context("fork")
        for mode in ("list", "flat"):
            assert _in_process(ctx, "adamw", 21, mode) == expected[mode], f"forked child ({mode})"
    finally:
        stop.set()
        t.join(60)
    # The parent still steps after forking.
    assert train("adamw", 21, "flat") == expected["flat"]


def test_step_in_spawn_worker():
    ctx = multiprocessing.get_context("spawn")
    for name, mode in (("lamb", "list"), ("adam", "flat")):
        assert _in_process(ctx, name, 4, mode) == train(name, 4, mode), f"spawn worker: {name}/{mode}"
