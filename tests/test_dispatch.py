"""Backend choice: backend= argument > ``with fo.backend(...)`` > FASTOPT_BACKEND > auto.

Which backend ran is observed with spies on the two ways a step can go: the CPU
backend's ``run`` and the optimizer's ``_reference`` (the ``"numpy"`` backend).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import fastopt as fo
from fastopt import _backend

from cases import assert_close


@pytest.fixture
def spy(monkeypatch):
    """A list that records 'cpu' or 'numpy' for every bucket an Adam step runs."""
    calls: list = []
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
    ref = _backend._Reference.step
    run = _backend._CpuBackend.run

    def spy_reference(self, *args, **kwargs):
        calls.append("numpy")
        return ref(self, *args, **kwargs)

    def spy_run(self, *args, **kwargs):
        calls.append("cpu")
        return run(self, *args, **kwargs)

    monkeypatch.setattr(_backend._Reference, "step", spy_reference)
    monkeypatch.setattr(_backend._CpuBackend, "run", spy_run)
    return calls


def _step(backend=None, functional=False):
    p = [np.ones(5, np.float32)]
    g = [np.full(5, 0.5, np.float32)]
    if functional:
        fo.functional.adam(p, g, [np.zeros(5, np.float32)], [np.zeros(5, np.float32)], backend=backend)
    else:
        fo.Adam(p, backend=backend).step(g)
    return p[0]


# (explicit backend=, with fo.backend(), FASTOPT_BACKEND) -> the backend that must run
PRECEDENCE = [
    ((None, None, None), "cpu"),              # auto: NumPy arrays run on the CPU
    ((None, None, "numpy"), "numpy"),
    ((None, None, "cpu"), "cpu"),
    ((None, "numpy", "cpu"), "numpy"),        # context beats env
    ((None, "cpu", "numpy"), "cpu"),
    (("numpy", "cpu", "cpu"), "numpy"),       # argument beats both
    (("cpu", "numpy", "numpy"), "cpu"),
    (("numpy", None, None), "numpy"),
]


def _pid(args):
    (arg, ctx, env), want = args
    return f"arg={arg}-ctx={ctx}-env={env}->{want}"


@pytest.mark.parametrize("functional", [False, True], ids=["class", "functional"])
@pytest.mark.parametrize("setting,want", PRECEDENCE, ids=[_pid(a) for a in PRECEDENCE])
def test_precedence(spy, monkeypatch, setting, want, functional):
    arg, ctx, env = setting
    if env is not None:
        monkeypatch.setenv("FASTOPT_BACKEND", env)
    if ctx is not None:
        with fo.backend(ctx):
            result = _step(arg, functional)
    else:
        result = _step(arg, functional)
    assert spy == [want]
    assert_close([result], [_reference_result()], np.float32, "one Adam step")


def _reference_result():
    p = np.ones(5, np.float32)
    # Adam's first step moves every element by lr against the gradient's sign.
    return p - np.float32(1e-3)


def test_backend_is_resolved_at_each_step(spy):
    """The same optimizer follows the context it steps in (its plan is rebuilt)."""
    p = [np.ones(70000, np.float32)]
    opt = fo.Adam(p)
    g = [np.ones(70000, np.float32)]
    opt.step(g)
    with fo.backend("numpy"):
        opt.step(g)
    opt.step(g)
    assert spy == ["cpu", "numpy", "cpu"]
    q = [np.ones(70000, np.float32)]
    ref = fo.Adam(q, backend="numpy")
    for _ in range(3):
        ref.step(g)
    assert_close(p, q, np.float32, "mixed-backend run vs reference")


def test_context_is_per_thread(spy):
    seen = []
    with fo.backend("numpy"):
        t = threading.Thread(target=lambda: seen.append(_backend.resolve(None)))
        t.start()
        t.join()
        assert _backend.resolve(None) == "numpy"
    assert seen == ["cpu"]
    assert _backend.resolve(None) == "cpu"


def test_context_nests_and_restores(spy):
    with fo.backend("numpy"):
        with fo.backend("cpu"):
            assert _backend.resolve(None) == "cpu"
        assert _backend.resolve(None) == "numpy"
    assert _backend.resolve(None) == "cpu"
    with pytest.raises(RuntimeError):
        with fo.backend("numpy"):
            raise RuntimeError("boom")
    assert _backend.resolve(None) == "cpu"


def test_auto_picks_cuda_for_device_arrays(monkeypatch):
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)

    class DeviceArray:
        __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}

    assert _backend.resolve(None, DeviceArray()) == "cuda"
    assert _backend.resolve(None, np.zeros(1)) == "cpu"
    assert _backend.resolve("numpy", DeviceArray()) == "numpy"


@pytest.mark.parametrize("where", ["argument", "context", "env", "functional"])
def test_unknown_backend_names_raise(monkeypatch, where):
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
    p = [np.ones(3, np.float32)]
    g = [np.ones(3, np.float32)]
    if where == "argument":
        with pytest.raises(ValueError, match=r"backend must be one of .*'gpu'"):
            fo.Adam(p, backend="gpu")
    elif where == "context":
        with pytest.raises(ValueError, match=r"backend must be one of .*'tpu'"):
            with fo.backend("tpu"):
                pass
    elif where == "env":
        monkeypatch.setenv("FASTOPT_BACKEND", "Cpu")
        opt = fo.Adam(p)
        with pytest.raises(ValueError, match=r"FASTOPT_BACKEND must be one of .*'Cpu'"):
            opt.step(g)
        assert opt.state == {}
    else:
        with pytest.raises(ValueError, match=r"backend must be one of .*'fast'"):
            fo.functional.adam(p, g, [np.zeros(3, np.float32)], [np.zeros(3, np.float32)], backend="fast")
    assert np.array_equal(p[0], np.ones(3, np.float32))


def _cuda_usable() -> bool:
    try:
        _backend.get("cuda")
        return True
    except fo.BackendUnavailableError:
        return False


@pytest.mark.parametrize("how", ["argument", "context", "env", "functional"])
def test_cuda_unavailable_raises_with_cause(monkeypatch, how):
    """Without a GPU (or numba-cuda/cupy), "cuda" raises BackendUnavailableError whose
    __cause__ is the original error, and nothing is changed: no param, no state."""
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
    if _cuda_usable():
        pytest.skip("a CUDA backend is usable here")
    p = [np.ones(4, np.float32), np.ones(3, np.float64)]
    g = [np.ones(4, np.float32), np.ones(3, np.float64)]
    opt = fo.Adam(p)
    opt.step(g)                                   # some state exists before
    before = opt.state_dict()
    values = [a.copy() for a in p]
    with pytest.raises(fo.BackendUnavailableError, match="cuda") as err:
        if how == "argument":
            fo.Adam(p, backend="cuda").step(g)
        elif how == "context":
            with fo.backend("cuda"):
                opt.step(g)
        elif how == "env":
            monkeypatch.setenv("FASTOPT_BACKEND", "cuda")
            opt.step(g)
        else:
            fo.functional.adam(p, g, [np.zeros(4, np.float32), np.zeros(3)],
                               [np.zeros(4, np.float32), np.zeros(3)], backend="cuda")
    assert isinstance(err.value, ImportError)
    assert err.value.__cause__ is not None
    assert str(err.value)
    for a, b in zip(p, values):
        assert np.array_equal(a, b)
    after = opt.state_dict()
    assert sorted(after["state"]) == sorted(before["state"])
    for i, st in before["state"].items():
        for k, v in st.items():
            assert np.array_equal(after["state"][i][k], v)
    # A fresh optimizer whose first step fails creates no state either.
    fresh = fo.Adam(p, backend="cuda")
    with pytest.raises(fo.BackendUnavailableError):
        fresh.step(g)
    assert fresh.state == {} and fresh.state_dict()["state"] == {}
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
    opt.step(g)                                   # and the optimizer still works on the CPU
    assert int(opt.state[0]["step"]) == 2
