"""Numerics at the edges: no NaN (or infinity) that torch does not also produce.

- Zero gradients, huge (1e30 / 1e300), large-but-finite-square (1e20 / 1e160), tiny
  (1e-30 / 1e-300) and subnormal gradients, alone and mixed in one tensor, for every
  optimizer, float32 and float64: NaN and infinity masks identical to torch.optim's
  (when torch is importable) and to the NumPy reference, the finite values within
  tolerance.
- Step counts beyond 1e7 (1e7, 1e8, 2**24 + 1, 1e9; loaded through load_state_dict):
  bias corrections, RAdam's rectification, NAdam's momentum schedule and Adagrad's lr
  decay stay finite and equal torch's; the step counter stays exact.
- float16 params with float32 master weights and eps at float16's limits (its smallest
  subnormal, its smallest normal, below its range, and 0): NaN exactly where torch,
  stepping the float32 masters, has NaN; the float16 params are the masters rounded.
"""
from __future__ import annotations


import numpy as np
import pytest

import fastopt as fo

from cases import assert_close, assert_same_nonfinite, rms, sd_to_torch, torch_params
from reliability_cases import ALL_CASES, STATS, TORCH_NAMES

try:
    import torch
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None

CASE_PARAMS = [pytest.param(c, id=c.name) for c in ALL_CASES]


def magnitudes(dtype):
    """Gradient magnitudes at the edges of ``dtype``. ``large``: g*g overflows but
    (1 - beta2) * g * g does not (torch's addcmul keeps it finite)."""
    f = np.finfo(dtype)
    if dtype == np.float32:
        return {"zero": 0.0, "huge": 1e30, "large": 2e19, "tiny": 1e-30,
                "subnormal": float(f.smallest_subnormal) * 7, "max": float(f.max)}
    return {"zero": 0.0, "huge": 1e300, "large": 2e154, "tiny": 1e-300,
            "subnormal": float(f.smallest_subnormal) * 7, "max": float(f.max)}


def edge_grads(dtype, kind, n_steps, seed=0):
    """Per step, one gradient per param: ``kind``'s magnitude with random signs, or
    ("mixed") zero, huge, tiny, subnormal and max side by side in one tensor."""
    rng = np.random.default_rng(seed)
    mags = magnitudes(dtype)
    mixed = [mags[k] for k in ("zero", "huge", "tiny", "subnormal", "max")]
    shapes = [(8,), (3, 4), ()]
    out = []
    for _ in range(n_steps):
        step = []
        for s in shapes:
            signs = rng.choice([-1.0, 1.0], size=s)
            vals = rng.choice(mixed, size=s) if kind == "mixed" else np.full(s, mags[kind])
            step.append(np.asarray(signs * vals, dtype=dtype))
        out.append(step)
    return shapes, out


class Run:
    """The same run through fastopt cpu (list mode), the reference, and torch."""

    def __init__(self, case, hp, init, with_torch):
        self.fo_params = [a.copy() for a in init]
        self.ref_params = [a.copy() for a in init]
        self.fo = case.fo_cls(self.fo_params, **hp)
        self.ref = case.fo_cls(self.ref_params, backend="numpy", **hp)
        self.t_params = torch_params(init) if with_torch else None
        self.t = case.torch_cls()(self.t_params, **hp) if with_torch else None

    def step(self, grads):
        with np.errstate(all="ignore"):
            self.fo.step(grads)
            self.ref.step([g.copy() for g in grads])
        if self.t is not None:
            for p, g in zip(self.t_params, grads):
                p.grad = torch.from_numpy(g.copy())
            self.t.step()

    def arrays(self, which, name):
        if which == "torch":
            if name == "params":
                return [p.detach().numpy() for p in self.t_params]
            return [self.t.state[p][name].numpy() if name in self.t.state.get(p, {}) else None
                    for p in self.t_params]
        opt, params = (self.fo, self.fo_params) if which == "fastopt" else (self.ref, self.ref_params)
        if name == "params":
            return params
        st = opt.state
        return [st[i][name] if i in st and name in st[i] else None for i in range(len(params))]


def _compare(run, case, dtype, when, torch_too):
    """Non-finite masks equal, finite parts close: fastopt vs reference (and torch)."""
    for name in ("params",) + tuple(case.slot_names):
        mine = run.arrays("fastopt", name)
        for oracle in ["reference"] + (["torch"] if torch_too else []):
            exp = run.arrays(oracle, name)
            keep = [k for k, e in enumerate(exp) if e is not None and mine[k] is not None]
            a, b = [np.asarray(mine[k]) for k in keep], [np.asarray(exp[k]) for k in keep]
            assert_same_nonfinite(a, b, f"{when}: {name} vs {oracle}")
            fin = [np.isfinite(x) for x in b]
            a = [x[m].astype(np.float64) for x, m in zip(a, fin)]
            b = [x[m].astype(np.float64) for x, m in zip(b, fin)]
            # Values near the float64 limit: compare in units of the largest one (a norm
            # of 1e300s overflows).
            top = max([np.abs(x).max() for x in b if x.size] + [0.0])
            if top > 0:
                a, b = [x / top for x in a], [x / top for x in b]
            assert_close([x.astype(dtype) for x in a], [x.astype(dtype) for x in b], dtype,
                         f"{when}: {name} vs {oracle} (finite part, in units of {top:.3g})",
                         scale=max(rms(b), 1e-300))
            STATS["numerics_comparisons"] += 1


KINDS = ["zero", "huge", "large", "tiny", "subnormal", "mixed"]

# Known gaps (strict xfail: each turns into a failure once fixed). See RELIABILITY.md.
_ONE_SQRT = ("kernels/adadelta.py takes one square root of the ratio (acc_delta + eps) / "
             "(square_avg + eps) where torch takes two; at |g| ~ 1e19 the two roundings "
             "differ by ~1e-5 relative (within rounding at ordinary magnitudes)")
_CENTERED = ("kernels/rmsprop.py:38 square_avg - grad_avg * grad_avg is inf - inf = NaN "
             "once square_avg is inf; torch's addcmul (a fused multiply-add) gives inf")
_TRUST_F32 = ("LAMB: kernels/lamb.py squares in float32 before the float64 accumulation "
              "(its first pass keeps 8-lane float32 vectors for the division and square "
              "root), so the per-tensor norms overflow or underflow where the reference's "
              "float64 norms do not, and the trust ratios differ")
_LARS_REFERENCE_CAST = ("LARS, subnormal float32 gradients: ||u|| ~ 1e-44 makes a trust "
                        "ratio ~1e41, which overflows float32 where the step multiplies by "
                        "it: fastopt and the reference both make non-finite params (optax's "
                        "float32 norm underflows to 0 and takes the ratio 1)")

_LAMB_RECIPROCAL = ("kernels/lamb.py multiplies by 1 / (1 - b^t) where optax divides by "
                    "(1 - b^t) (one division per element, not three): a first moment within "
                    "one ulp of the float64 maximum stays finite where the division "
                    "overflows, and the reference's update, and so its trust ratio, is NaN")


_ADAN_SQUARE = ("Adan squares g + beta2 (g - g_prev), up to (1 + 2 beta2) times a gradient: "
                "the 'large' gradients are sized so that Adam's g^2 stays finite, and with "
                "betas (0.5, 0.5, 0.9) this square overflows in float64; the reference and "
                "pytorch_optimizer.Adan compute the same square")


def _known_gap(case, rowi, kind, dtype):
    if case.name == "adan" and rowi == 1 and kind == "large" and dtype == np.float64:
        return _ADAN_SQUARE
    if dtype == np.float64 and case.name == "lamb" and rowi == 1 and kind == "mixed":
        return _LAMB_RECIPROCAL
    if kind == "large" and case.name == "adadelta":
        return _ONE_SQRT
    if case.name == "rmsprop" and rowi == 1 and kind in ("huge", "mixed") and torch is not None:
        return _CENTERED  # a difference from torch only: the reference agrees with fastopt
    if dtype == np.float32 and case.name == "lamb" and rowi == 0 and kind in ("tiny", "subnormal", "mixed"):
        return _TRUST_F32
    if dtype == np.float32 and case.name == "lars" and rowi == 0 and kind == "subnormal":
        return _LARS_REFERENCE_CAST
    return None


def _edge_params():
    out = []
    for case in ALL_CASES:
        for rowi, row in enumerate((case.grid[0], case.full)):
            for kind in KINDS:
                for dtype in (np.float32, np.float64):
                    gap = _known_gap(case, rowi, kind, dtype)
                    marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
                    out.append(pytest.param(case, row, kind, dtype, marks=marks,
                                            id=f"{case.name}-{rowi}-{kind}-{np.dtype(dtype).name}"))
    return out


@pytest.mark.parametrize("case,row,kind,dtype", _edge_params())
def test_edge_gradients_nan_only_where_torch_has_nan(case, row, kind, dtype):
    hp = case.hp(row)
    torch_too = torch is not None and case.name in TORCH_NAMES
    rng = np.random.default_rng(1)
    shapes, grads = edge_grads(dtype, kind, 3, seed=KINDS.index(kind))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    run = Run(case, hp, init, torch_too)
    for k, g in enumerate(grads):
        run.step(g)
        _compare(run, case, dtype, f"{case.name} {kind} step {k + 1}", torch_too)
    if kind in ("zero", "tiny", "subnormal", "large"):
        # Gradients whose moments (but for Adagrad's plain sum of squares) stay finite:
        # no NaN anywhere, no infinity either.
        for name in ("params",) + tuple(case.slot_names):
            for a in run.arrays("fastopt", name):
                if a is None or (case.name == "adagrad" and name == "sum"):
                    continue
                assert not np.isnan(a).any(), f"{case.name} {kind}: NaN in {name}"
                assert np.all(np.isfinite(a)), f"{case.name} {kind}: infinity in {name}"
    STATS["numerics_runs"] += 1


# -- step counts beyond 1e7 ----------------------------------------------------------------
STEP_DEPENDENT = [c for c in ALL_CASES if c.fo_cls.has_step_state]


@pytest.mark.parametrize("start", [10 ** 7, 10 ** 8, 2 ** 24 + 1, 10 ** 9])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in STEP_DEPENDENT])
def test_step_counts_beyond_1e7(case, start):
    hp = case.hp({**case.full, **({"lr_decay": 1e-3} if case.name == "adagrad" else {})})
    rng = np.random.default_rng(2)
    shapes = [(6,), (2, 3)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    first = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [a.copy() for a in init]
    opt = case.fo_cls(params, **hp)
    opt.step(first)                               # real state, then the step count moved
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = np.float64(start)
    opt.load_state_dict(sd)
    ref_params = [a.copy() for a in params]
    ref = case.fo_cls(ref_params, backend="numpy", **hp)
    ref.load_state_dict(sd)
    torch_too = torch is not None and case.name in TORCH_NAMES and start < 2 ** 24 * 64
    if torch_too:
        tp = torch_params(params)
        topt = case.torch_cls()(tp, **hp)
        tsd = sd_to_torch(sd)
        for st in tsd["state"].values():
            st["step"] = torch.tensor(float(start), dtype=torch.float32)
        tsd["param_groups"][0].pop("iterations", None)
        topt.load_state_dict({"state": tsd["state"], "param_groups": tsd["param_groups"]})
    for k in range(3):
        g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(g)
        ref.step([x.copy() for x in g])
        for p in params:
            assert np.all(np.isfinite(p)), f"{case.name} at step {start + k + 1}: non-finite params"
        assert_close(params, ref_params, np.float32, f"{case.name} step {start + k + 1} vs reference")
        if torch_too:
            for t, x in zip(tp, g):
                t.grad = torch.from_numpy(x.copy())
            topt.step()
            assert_close(params, [t.detach().numpy() for t in tp], np.float32,
                         f"{case.name} step {start + k + 1} vs torch")
    # The counter is exact (torch's float32 step would have stopped at 1e8 + 0).
    assert [int(s) for s in opt._steps] == [start + 3] * len(params)
    back = opt.state_dict()
    assert all(int(st["step"]) == start + 3 for st in back["state"].values())
    STATS["numerics_runs"] += 1


# -- float16 with master weights, eps at float16's limits ----------------------------------
F16 = np.finfo(np.float16)
EPS = {"fp16_smallest_subnormal": float(F16.smallest_subnormal), "fp16_smallest_normal":
       float(F16.smallest_normal), "below_fp16": 1e-10, "zero": 0.0}


def _fp16_grads(rng, shapes, kind):
    out = []
    for s in shapes:
        if kind == "zero":
            g = np.zeros(s, np.float16)
        elif kind == "subnormal":
            g = (rng.choice([-1, 1], size=s) * F16.smallest_subnormal * rng.integers(1, 4, size=s))
        elif kind == "edge":
            g = rng.choice([0.0, float(F16.smallest_subnormal), float(F16.max), -float(F16.max),
                            1e-3, np.inf], size=s)
        else:
            g = rng.standard_normal(s)
        out.append(np.asarray(g, np.float16))
    return out


@pytest.mark.parametrize("kind", ["zero", "subnormal", "normal", "edge"])
@pytest.mark.parametrize("eps", list(EPS.values()), ids=list(EPS))
def test_float16_master_weights_eps_at_fp16_limits(eps, kind):
    rng = np.random.default_rng(3)
    shapes = [(16,), (4, 4)]
    init = [rng.standard_normal(s).astype(np.float16) for s in shapes]
    params = [a.copy() for a in init]
    opt = fo.Adam(params, lr=1e-3, eps=eps, master_weights=True)
    ref_params = [a.copy() for a in init]
    ref = fo.Adam(ref_params, lr=1e-3, eps=eps, master_weights=True, backend="numpy")
    if torch is not None:
        masters = [torch.from_numpy(a.astype(np.float32)) for a in init]
        topt = torch.optim.Adam(masters, lr=1e-3, eps=eps)
    for k in range(4):
        g = _fp16_grads(rng, shapes, kind if kind != "edge" or k < 3 else "normal")
        with np.errstate(all="ignore"):
            opt.step(g)
            ref.step([x.copy() for x in g])
        mine = [opt.state[i]["master_param"] for i in range(len(params))]
        theirs = [ref.state[i]["master_param"] for i in range(len(params))]
        assert_same_nonfinite(mine, theirs, f"eps={eps} {kind} step {k + 1}: masters vs reference")
        if torch is not None:
            for t, x in zip(masters, g):
                t.grad = torch.from_numpy(x.astype(np.float32))
            topt.step()
            tm = [t.detach().numpy() for t in masters]
            assert_same_nonfinite(mine, tm, f"eps={eps} {kind} step {k + 1}: masters vs torch")
            fin = [np.isfinite(x) for x in tm]
            assert_close([a[m] for a, m in zip(mine, fin)], [b[m] for b, m in zip(tm, fin)],
                         np.float32, f"eps={eps} {kind} step {k + 1}: finite masters vs torch")
        # The float16 params are the masters rounded to nearest (NaN where they are NaN).
        for p, m in zip(params, mine):
            assert np.array_equal(p, m.astype(np.float16), equal_nan=True)
        if eps > 0 and kind != "edge":
            assert all(np.all(np.isfinite(m)) for m in mine), f"eps={eps} {kind}: non-finite"
    STATS["numerics_runs"] += 1
