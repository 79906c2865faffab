"""The table of optimizers under test, and the comparison helpers every test file shares.

One :class:`Case` per optimizer spec (``fastopt/spec.py``, listed in
``kernels/registry.py``) that declares test examples: its fastopt class, its external
oracle, its functional form, and its grid of hyperparameters in which every flag and
every optional term is on in some row and off in another. A new optimizer gets every
test that runs over :data:`CASES` from its spec.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from typing import Callable

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels.registry import SPECS
from fastopt.optimizers import CLASSES
from fastopt.spec import flat_hypers

# Relative tolerances of the parity tests, per storage dtype.
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
DTYPES = (np.float32, np.float64)


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer under test.

    Attributes:
      name: short id (``"adam"``), also the functional function's name.
      fo_cls: the fastopt class.
      torch_name: the oracle's class name (``torch.optim.<torch_name>`` for torch's).
      grid: hyperparameter overrides; every flag is on in some row and off in another.
      full: the row with the most terms active (used by the costlier tests).
      base: hyperparameters every row starts from (a learning rate that moves params).
      oracle: the external implementation, ``module.Class``.
    """

    name: str
    fo_cls: type
    torch_name: str
    grid: tuple
    full: dict
    base: dict
    oracle: str = ""

    def hp(self, row: dict | None = None) -> dict:
        return {**self.base, **(self.full if row is None else row)}

    @property
    def spec(self):
        return self.fo_cls.spec

    @property
    def functional(self) -> Callable:
        return getattr(fo.functional, self.name)

    @property
    def slot_names(self) -> tuple:
        return tuple(self.fo_cls.slot_names)

    @property
    def in_torch(self) -> bool:
        return self.oracle.startswith("torch.optim.")

    def torch_cls(self):
        module, _, name = self.oracle.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def functional_kwargs(self, hp: dict) -> dict:
        """Class hyperparameters -> the functional form's keywords."""
        keep = {h.name for h in self.spec.settable if h.functional} | {"betas"}
        return flat_hypers({k: v for k, v in hp.items() if k in keep})

    def initial_state(self, hp: dict, name: str) -> float:
        return self.spec.initial_value({**{h.name: h.default for h in self.spec.hypers}, **hp}, name)


def _case(spec) -> Case:
    ex = spec.examples
    assert ex.full in ex.grid, f"{spec.name}: the full row must be one of the grid's rows"
    return Case(spec.functional or spec.name.lower(), CLASSES[spec.name], spec.oracle.rpartition(".")[2],
                tuple(ex.grid), ex.full, ex.base, spec.oracle)


# Optimizers with examples and torch.optim as their oracle; the others (Adan: its oracle
# is pytorch-optimizer) are in EXTERNAL_CASES, tested against their oracle where the
# test names one.
CASES = tuple(_case(s) for s in SPECS if s.examples is not None and s.oracle.startswith("torch.optim."))
EXTERNAL_CASES = tuple(_case(s) for s in SPECS
                       if s.examples is not None and not s.oracle.startswith("torch.optim."))

BY_NAME = {c.name: c for c in CASES}
# Every optimizer with examples, whatever its oracle: what tests that need no external
# oracle (the reference, the backends, bad input, state dicts) run over.
ALL_CASES = CASES + EXTERNAL_CASES
ALL_BY_NAME = {c.name: c for c in ALL_CASES}


def row_id(row: dict) -> str:
    """A readable pytest id for a hyperparameter row: ``momentum=0.9,nesterov``."""
    if not row:
        return "defaults"
    parts = []
    for k, v in row.items():
        if v is True:
            parts.append(k)
        elif isinstance(v, tuple):
            parts.append(f"{k}=" + "/".join(map(str, v)))
        else:
            parts.append(f"{k}={v}")
    return ",".join(parts)


def grid_params(cases=CASES):
    """(case, row) pairs of every grid row, with ids like ``adam-amsgrad``."""
    import pytest
    return [pytest.param(c, row, id=f"{c.name}-{row_id(row)}") for c in cases for row in c.grid]


def case_params(cases=CASES):
    import pytest
    return [pytest.param(c, id=c.name) for c in cases]


# -- bad hyperparameters, from the specs ------------------------------------------------
NAN, INF = math.nan, math.inf

# Values every hyperparameter of a kind must refuse. Which hyperparameters an optimizer
# has, their names and their kinds come from its spec (hyper_kind); a betas tuple's bad
# values are made from its default (bad_hyperparameters).
BAD_VALUES = {
    "flag": ["yes", None, 0, 1],                       # only a bool is a flag
    "real": [NAN, INF, "0.1"],                         # a finite real number
    "nonnegative": [-0.1, NAN, INF, "0.1"],            # ... and >= 0
    "unit": [-0.1, 1.5, NAN, INF, "0.1"],              # ... in [0, 1]
}


def _refuses(h, value) -> bool:
    try:
        h.check(value, "")
    except (TypeError, ValueError):
        return True
    return False


def hyper_kind(h) -> str:
    """The kind of hyperparameter ``h`` (a :class:`fastopt.spec.Hyper`) by its default and
    its declared check: "flag", "betas", "real", "nonnegative", "unit", "declared" (the
    spec lists its bad values: ``Hyper.bad``), or "unknown" (a check the bad-value table
    does not know: tests fail on it)."""
    if h.bad:
        return "declared"
    if isinstance(h.default, bool):
        return "flag"
    if isinstance(h.default, tuple):
        return "betas"
    if h.check is None:
        return "unknown"
    return {(False, False): "real", (True, False): "nonnegative",
            (True, True): "unit"}.get((_refuses(h, -0.1), _refuses(h, 1.5)), "unknown")


def bad_hyperparameters(case, first_only=False) -> list:
    """``[(name, bad value, the name the error must mention)]`` for every hyperparameter
    of ``case``'s spec (the fixed ones, as AdamW's ``decoupled_weight_decay``, too: they
    are in the groups). ``first_only``: one value per hyperparameter (two for betas)."""
    out = []
    for h in case.spec.hypers:
        kind = hyper_kind(h)
        if kind == "betas":
            values = []
            for k in range(len(h.default)):
                for bad in (1.0, -0.1, NAN):
                    v = list(h.default)
                    v[k] = bad
                    values.append((tuple(v), f"{h.name}[{k}]"))
            values += [(h.default[:-1], h.name), (h.default[0], h.name)]
            out += [(h.name, v, m) for v, m in (values[::3] if first_only else values)]
        else:
            values = list(h.bad) if kind == "declared" else BAD_VALUES.get(kind, [])
            out += [(h.name, v, h.name) for v in (values[:1] if first_only else values)]
    return out


def bad_value_id(name, value) -> str:
    return f"{name}={value!r}".replace(" ", "")


# -- comparisons ------------------------------------------------------------------------
def rel_err(a, b, scale=0.0) -> float:
    """||a - b|| / max(||b||, sqrt(n) * scale, tiny): one number per tensor of n elements.

    Element-wise relative error is meaningless here: parameters and state cross zero
    during training, and at an element near zero a difference of one rounding step is
    an arbitrarily large *relative* error although both results are equally right.
    Normalising by the tensor's norm measures the error against the magnitude of the
    values the optimizer works with. For a tensor of one or a few elements the norm is
    the element itself, so the norm is floored at ``sqrt(n) * scale``, where ``scale``
    is the RMS of the whole run's tensors (see :func:`assert_close`): rounding errors
    scale with the values a computation passes through, not with where an element
    happens to end up. (Measured: torch computes ``add(alpha=)`` and ``addcdiv`` with
    fused multiply-adds; after 200 float32 SGD steps 123 of 2000 one-element tensors
    differ from torch by more than 1e-6 element-wise, up to 2.5e-4 at an element near
    zero, while the norm-relative error over all of them is 1.3e-7 and fastopt equals
    the reference bit for bit.)
    The floor forgives nothing above rounding level: a wrong or skipped update of even
    one element is an error of the order of the update, far above 1e-6 of the scale.
    ``tiny`` keeps an all-zero (or empty) tensor at 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    floor = max(np.sqrt(b.size) * scale, np.finfo(np.float64).tiny)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), floor))


def rms(arrays) -> float:
    """Root mean square of all finite elements of ``arrays`` (0 when there are none)."""
    flat = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in arrays] + [np.zeros(0)])
    flat = flat[np.isfinite(flat)]
    return float(np.sqrt(np.mean(flat * flat))) if flat.size else 0.0


def assert_close(actual, expected, dtype, what, scale=None):
    """Every tensor of ``actual`` within RTOL of ``expected`` (norm-relative, see rel_err).

    ``scale`` defaults to the RMS of all of ``expected``: the run's magnitude.
    """
    tol = RTOL[np.dtype(dtype)]
    assert len(actual) == len(expected), what
    if scale is None:
        scale = rms(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert np.dtype(np.asarray(a).dtype) == np.dtype(dtype), f"{what}[{i}] dtype {np.asarray(a).dtype}"
        err = rel_err(a, b, scale)
        assert err <= tol, f"{what}[{i}] (shape {np.shape(a)}): relative error {err:.3g} > {tol:g}"


def assert_same_nonfinite(actual, expected, what):
    """NaN masks equal, infinities at the same places with the same signs."""
    for i, (a, b) in enumerate(zip(actual, expected)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}[{i}]: NaN masks differ"
        assert np.array_equal(np.isposinf(a), np.isposinf(b)), f"{what}[{i}]: +inf masks differ"
        assert np.array_equal(np.isneginf(a), np.isneginf(b)), f"{what}[{i}]: -inf masks differ"


def assert_close_nonfinite(actual, expected, dtype, what):
    """Non-finite masks identical; the finite elements within RTOL (norm-relative)."""
    assert_same_nonfinite(actual, expected, what)
    fin = [np.isfinite(np.asarray(b)) for b in expected]
    assert_close([np.asarray(a)[m] for a, m in zip(actual, fin)],
                 [np.asarray(b)[m] for b, m in zip(expected, fin)], dtype, what + " (finite part)",
                 scale=rms(expected))


# -- torch conversion -------------------------------------------------------------------
def sd_to_numpy(sd):
    """A torch state dict with every tensor turned into a NumPy array (copies)."""
    import torch

    def conv(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().numpy()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, tuple):
            return tuple(conv(v) for v in x)
        return x
    return conv(sd)


def sd_to_torch(sd):
    """A fastopt state dict with every array turned into a tensor (``step`` as torch keeps it)."""
    import torch

    def conv(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.array(x))
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    out = conv(sd)
    for st in out["state"].values():
        if "step" in st:
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
    return out


def torch_params(arrays):
    """torch tensors sharing memory with copies of ``arrays`` (read them back via .numpy())."""
    import torch
    return [torch.from_numpy(np.array(a, copy=True)) for a in arrays]


def torch_step(opt, params, grads):
    """One torch.optim step with ``grads`` (None leaves that param's grad unset)."""
    import torch
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.from_numpy(g)
    opt.step()



# -- one training run through several implementations ---------------------------------
class Grads:
    """Random gradients for tensors of ``shapes``: one flat vector per step and its views.

    Args:
      fresh: new gradient arrays every step (exercises re-validation and table
        re-targeting); otherwise one buffer refilled in place, the same array objects
        each step, as a training loop with persistent grad buffers has.
      pool: draw each step as a randomly offset, randomly scaled window of one long
        random vector: random per element and per step, at the cost of a slice (for
        large totals, where drawing fresh normals every step would dominate the run).
    """

    def __init__(self, shapes, dtype, seed, *, fresh=True, pool=False):
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.fresh = fresh
        self.pool = (self.rng.standard_normal(self.total + 8191).astype(self.dtype)
                     if pool else None)
        self.buffer = None if fresh else np.empty(self.total, self.dtype)
        self.views = None if fresh else self._views(self.buffer)

    def _views(self, flat):
        return [flat[lo:hi].reshape(s) for lo, hi, s in
                zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def _draw(self, out):
        if self.pool is not None:
            o = int(self.rng.integers(0, 8192))
            np.multiply(self.pool[o:o + self.total], self.dtype.type(self.rng.uniform(0.5, 2.0)), out=out)
        else:
            out[...] = self.rng.standard_normal(self.total, dtype=self.dtype)

    def next(self):
        """(flat gradient, per-tensor views of it)."""
        if self.fresh:
            flat = np.empty(self.total, self.dtype)
            self._draw(flat)
            return flat, self._views(flat)
        self._draw(self.buffer)
        return self.buffer, self.views


def init_params(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


class Impl:
    """One implementation of a training run: its live params (NumPy views) and optimizer."""

    def __init__(self, name, params, opt, *, flat=None, torch_params=None):
        self.name = name
        self.params = params
        self.opt = opt
        self.flat = flat
        self.tparams = torch_params

    def step(self, flat_grad, grads):
        if self.tparams is not None:
            torch_step(self.opt, self.tparams, grads)
        elif self.flat is not None and all(g is not None for g in grads):
            self.flat.grad[...] = flat_grad      # FlatParams mode: step() reads flat.grads
            assert self.opt.step() is True
        else:
            assert self.opt.step(grads) is True

    def set_lr(self, factor):
        for g in self.opt.param_groups:
            g["lr"] = g["lr"] * factor

    def _torch_states(self):
        # torch.optim.Adagrad creates state (step 0) at construction; fastopt creates
        # state lazily at a param's first step, as every other torch optimizer does.
        # A step-0 state is "no state yet" in both.
        out = []
        for t in self.tparams:
            st = self.opt.state.get(t, {})
            out.append({} if "step" in st and float(st["step"]) == 0 else st)
        return out

    def state(self, name):
        """Per-param state arrays for ``name`` (None where a param has none)."""
        if self.tparams is not None:
            return [st[name].numpy() if name in st else None for st in self._torch_states()]
        st = self.opt.state
        return [st[i][name] if i in st and name in st[i] else None for i in range(len(self.params))]

    def steps(self):
        """Per-param step counts (None where a param has no state)."""
        if self.tparams is not None:
            return [int(st["step"]) if "step" in st else None for st in self._torch_states()]
        st = self.opt.state
        return [int(st[i]["step"]) if i in st and "step" in st[i] else None
                for i in range(len(self.params))]


def _grouped(params, groups):
    return [{"params": params[sl], **hp} for sl, hp in groups]


def make_impls(case, init, hp=None, *, groups=None, with_torch=True, flat_grads=True):
    """numpy-reference, cpu list, cpu FlatParams (and torch) runs from the same ``init``.

    Either ``hp`` (one group) or ``groups`` = [(slice, hp), ...] (contiguous groups).
    """
    def build(params, backend):
        if groups is None:
            return case.fo_cls(params, backend=backend, **hp)
        return case.fo_cls(_grouped(list(params.params) if isinstance(params, fo.FlatParams)
                                    else params, groups), backend=backend)

    ref = [a.copy() for a in init]
    lst = [a.copy() for a in init]
    flat = fo.FlatParams(init)
    impls = [Impl("numpy", ref, build(ref, "numpy")),
             Impl("cpu-list", lst, build(lst, "cpu")),
             Impl("cpu-flat", flat.params, build(flat, "cpu"), flat=flat)]
    if with_torch:
        tp = torch_params(init)
        cls = case.torch_cls()
        topt = cls(tp, **hp) if groups is None else cls(_grouped(tp, groups))
        impls.append(Impl("torch", [t.numpy() for t in tp], topt, torch_params=tp))
    return impls


def compare_impls(impls, dtype, when, slots=(), nonfinite=False):
    """cpu-list == cpu-flat exactly; both within RTOL of the reference and of torch.

    The reference is also compared with torch, so a wrong reference cannot hide.
    """
    by = {i.name: i for i in impls}
    check = assert_close_nonfinite if nonfinite else assert_close

    def arrays(impl, what):
        if what == "params":
            return impl.params
        return impl.state(what)

    for what in ("params",) + tuple(slots):
        lst, flat = arrays(by["cpu-list"], what), arrays(by["cpu-flat"], what)
        for k, (a, b) in enumerate(zip(lst, flat)):
            assert (a is None) == (b is None), f"{when}: {what}[{k}] present in one mode only"
            if a is not None:
                assert np.array_equal(a, b, equal_nan=True), \
                    f"{when}: {what}[{k}] differs between list and FlatParams mode"
        for oracle in ("numpy", "torch"):
            if oracle not in by:
                continue
            exp = arrays(by[oracle], what)
            present = [k for k, e in enumerate(exp) if e is not None]
            assert present == [k for k, a in enumerate(lst) if a is not None], \
                f"{when}: {what} exists for params {present} in {oracle} but not in fastopt"
            check([lst[k] for k in present], [exp[k] for k in present], dtype,
                  f"{when}: cpu vs {oracle}: {what}")
        if "torch" in by:
            exp, ref = arrays(by["torch"], what), arrays(by["numpy"], what)
            present = [k for k, e in enumerate(exp) if e is not None]
            check([ref[k] for k in present], [exp[k] for k in present], dtype,
                  f"{when}: reference vs torch: {what}")
    steps = [i.steps() for i in impls]
    assert all(s == steps[0] for s in steps), f"{when}: step counts differ: " + \
        ", ".join(f"{i.name}={s}" for i, s in zip(impls, steps))


# -- param groups -------------------------------------------------------------------------
def step_on(opt, grads, arena=None):
    """One step of ``opt`` with ``grads``: as a list, or copied into the FlatParams
    ``arena``'s gradients first (then ``opt.step()`` reads them)."""
    if arena is None:
        return opt.step(grads)
    for g, dst in zip(grads, arena.grads):
        dst[...] = g
    return opt.step()


def on_one_and_all_threads(run):
    """``run()`` with Numba on one thread, then on every thread (the thread count is
    restored after): the pair of results, for a test that they agree bit for bit.
    Skips where Numba has a single thread."""
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    if top < 2:
        pytest.skip("Numba has a single thread here")
    before = numba.get_num_threads()
    try:
        out = []
        for threads in (1, top):
            numba.set_num_threads(threads)
            out.append(run())
        return out
    finally:
        numba.set_num_threads(before)


def group_of(spec, **overrides) -> dict:
    """A full param group of ``spec`` (what its ``scalars(group, step, cast)`` reads): every
    hyperparameter's default, the fixed ones (AdamW's ``decoupled_weight_decay``) at their
    fixed value, then ``overrides`` (hyperparameters, or host state such as NAdam's
    ``mu_product``)."""
    return {**{h.name: h.default for h in spec.hypers}, **overrides}


# -- comparisons with an external oracle, in ulps of a run's scale -----------------------
class RunScales:
    """The largest magnitude each compared quantity has taken so far in a run (the scale
    an oracle comparison's tolerance is counted in)."""

    def __init__(self):
        self.seen = {}

    def update(self, name, arrays) -> float:
        m = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
        self.seen[name] = max(self.seen.get(name, 0.0), m)
        return self.seen[name]


def assert_within_ulps(ours, theirs, scale, dtype, what, ulps):
    """Every array of ``ours`` has ``dtype``, ``theirs``' shape, and differs from it by at
    most ``ulps`` units of ``dtype``'s epsilon times ``scale`` (:class:`RunScales`)."""
    tol = ulps * float(np.finfo(dtype).eps) * scale
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.dtype(dtype), f"{what}[{i}]: dtype {a.dtype}, not {np.dtype(dtype)}"
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} != {b.shape}"
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        assert err <= tol, (f"{what}[{i}] (shape {a.shape}): max |ours - oracle| = {err:.3g} > "
                            f"{ulps} ulp x run scale {scale:.3g} = {tol:.3g}")


# -- optional oracles -------------------------------------------------------------------------
def optional_module(name: str):
    """The module ``name``, or None when it is not installed: a file whose oracle is optional
    marks only its oracle tests with :func:`needs`, so its reference tests still run."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def needs(module, reason: str):
    """A mark skipping a test, saying ``reason``, when ``module`` (from
    :func:`optional_module`) is None."""
    return pytest.mark.skipif(module is None, reason=f"{reason} (not installed)")


# -- the backends a test can run on here ---------------------------------------------------
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@functools.lru_cache(maxsize=None)
def cuda_unavailable() -> str | None:
    """Why the "cuda" backend cannot run here, or None when it can."""
    from fastopt import _backend
    try:
        _backend.get("cuda")
    except fo.BackendUnavailableError as e:
        return f"no CUDA device (NUMBA_ENABLE_CUDASIM=1 runs these under the simulator): {e}"
    if not SIM:
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "a CUDA device without CuPy to hold the arrays"
    return None


def need_backend(backend):
    """Skip, saying why, when ``backend`` cannot run here."""
    if backend == "cuda" and cuda_unavailable():
        pytest.skip(cuda_unavailable())


def backend_memory(backend):
    """(to the backend's memory, back to a NumPy array): the simulator and the CPU
    backends take NumPy arrays, a GPU takes CuPy arrays."""
    if backend == "cuda" and not SIM:
        import cupy
        return cupy.asarray, cupy.asnumpy
    return (lambda a: a), (lambda a: np.array(a))


# -- worker processes on loopback (torch.distributed with gloo) ------------------------------
def run_gloo_workers(script, world, args, timeout_s, what):
    """Run ``python script RANK *args`` for ranks ``0 .. world-1`` with a fresh loopback
    rendezvous and one thread each; fail the test, with the rank's log, when one fails or
    they all take longer than ``timeout_s``."""
    import socket
    import subprocess
    import sys
    import time
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: workers did not finish within {timeout_s} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{what}: rank {r} failed:\n{log[-4000:]}"
