"""Shared pieces of the reliability tests (tests/test_reliability_*.py).

The optimizer table of :mod:`cases` plus fastopt's optax-named optimizers (Lion, LAMB,
LARS: no torch counterpart, so they are compared with the reference only), hypothesis
strategies for valid hyperparameters of each optimizer, and byte snapshots of
everything an optimizer owns.

Set ``FASTOPT_RELIABILITY_STATS=path.json`` to have the tests write the counts quoted in
RELIABILITY.md (examples run, bad inputs tried, bytes compared) when the process exits.
"""
from __future__ import annotations

import atexit
import collections
import inspect
import json
import os

import numpy as np
from hypothesis import strategies as st

import fastopt as fo
from cases import ALL_BY_NAME, ALL_CASES, CASES, EXTERNAL_CASES, hyper_kind  # noqa: F401 (re-exported)

# -- the optimizers -------------------------------------------------------------------
# The database of tests/cases.py; optimizers whose oracle is not torch (optax's Lion,
# LAMB, LARS; pytorch-optimizer's Adan) are compared with the reference here.
EXTRA_CASES = EXTERNAL_CASES
TORCH_NAMES = frozenset(c.name for c in CASES)


# -- counts for RELIABILITY.md -------------------------------------------------------
STATS: collections.Counter = collections.Counter()


def _dump_stats(path):
    try:
        old = json.load(open(path)) if os.path.exists(path) else {}
    except (OSError, ValueError):
        old = {}
    for k, v in STATS.items():
        old[k] = old.get(k, 0) + v
    with open(path, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)


if os.environ.get("FASTOPT_RELIABILITY_STATS"):
    atexit.register(_dump_stats, os.environ["FASTOPT_RELIABILITY_STATS"])


# -- valid hyperparameters ------------------------------------------------------------
def _maybe_zero(lo, hi):
    return st.one_of(st.just(0.0), st.floats(lo, hi))


_COMMON = {
    "weight_decay": _maybe_zero(1e-4, 0.1),
    "maximize": st.booleans(),
    "amsgrad": st.booleans(),
    "decoupled_weight_decay": st.booleans(),
    "centered": st.booleans(),
    "eps": st.sampled_from([1e-10, 1e-8, 1e-6, 1e-3]),
    "lr_decay": _maybe_zero(1e-4, 0.1),
    "initial_accumulator_value": _maybe_zero(1e-3, 1.0),
    "alpha": st.floats(0.5, 0.999),
    "rho": st.floats(0.5, 0.99),
    "momentum_decay": st.floats(1e-4, 1e-2),
    "eps_root": st.sampled_from([0.0, 1e-10, 1e-8]),
    "trust_coefficient": st.floats(1e-4, 1e-1),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
}
# Numerical tuning, optional: ranges found to keep long random runs well-conditioned. An
# optimizer or hyperparameter not named here gets a strategy derived from its spec
# (_from_spec), so a new optimizer needs no entry.
_LR = {"sgd": (1e-4, 0.1), "adagrad": (1e-3, 0.1), "rmsprop": (1e-4, 1e-2), "adadelta": (0.05, 1.0),
       "lion": (1e-5, 1e-3), "lars": (0.05, 1.0)}
_PER_CASE = {
    "lars": {"eps": st.sampled_from([0.0, 1e-8, 1e-6])},
    "lion": {"weight_decay": _maybe_zero(1e-4, 0.5)},
}


def _from_spec(case, h):
    """A strategy for hyperparameter ``h`` of ``case``'s spec, from the kind of its check,
    its default and the values the spec's examples use: flags on or off; betas with the
    first in [0, 0.99] and the others in [0.5, 0.9999]; a number between a tenth of the
    smallest nonzero value used and the largest, or 0 where the examples use 0."""
    kind = hyper_kind(h)
    if kind == "flag":
        return st.booleans()
    if kind == "betas":
        return st.tuples(st.floats(0.0, 0.99), *[st.floats(0.5, 0.9999)] * (len(h.default) - 1))
    if kind == "declared":
        # Values of other shapes (a pair of another meaning, a count): those the examples use.
        used = [case.hp(row).get(h.name, h.default) for row in case.grid] + [h.default]
        return st.sampled_from(list({repr(x): x for x in used}.values()))
    values = {float(case.hp(row).get(h.name, h.default)) for row in case.grid} | {float(h.default)}
    nonzero = sorted(v for v in values if v != 0)
    if not nonzero:
        return st.just(0.0)
    hi = min(nonzero[-1], 1.0) if kind == "unit" else nonzero[-1]
    drawn = st.floats(nonzero[0] / 10, hi)
    return st.one_of(st.just(0.0), drawn) if 0.0 in values else drawn


def default_hp(case) -> dict:
    """The hyperparameters the class's constructor takes, with their defaults (AdamW's
    groups hold ``decoupled_weight_decay`` but its constructor fixes it)."""
    hp = dict(case.fo_cls([np.zeros(1, np.float32)]).defaults)
    accepted = inspect.signature(case.fo_cls.__init__).parameters
    return {k: v for k, v in hp.items() if k in accepted}


@st.composite
def hyperparameters(draw, case) -> dict:
    """Valid hyperparameters for ``case``: every one of the class's, each drawn over its
    legal range (flags on or off; momentum-like terms zero or not)."""
    names = default_hp(case)
    hypers = {h.name: h for h in case.spec.hypers}
    hp = {}
    lo, hi = _LR.get(case.name, (1e-4, 0.05))
    hp["lr"] = draw(st.floats(lo, hi))
    for name in names:
        if name == "lr":
            continue
        if name == "momentum":
            zero_ok = _accepts(case, {**names, **hp, name: 0.0})   # SGDScheduleFree: (0, 1)
            hp[name] = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95)) if zero_ok
                            else st.floats(0.1, 0.95))
        elif name == "dampening":
            hp[name] = draw(_maybe_zero(0.01, 0.5))
        elif name == "nesterov":
            hp[name] = draw(st.booleans()) if _accepts(case, {**names, **hp, name: True}) else False
        else:
            strat = _PER_CASE.get(case.name, {}).get(name, _COMMON.get(name))
            if strat is None or (name == "betas" and len(hypers[name].default) != 2):
                strat = _from_spec(case, hypers[name])
            hp[name] = draw(strat)
    return hp


def _accepts(case, hp) -> bool:
    """Whether the spec's checks (its cross-hyperparameter rules included) accept ``hp``."""
    group = {h.name: h.default for h in case.spec.hypers}
    group.update(hp)
    try:
        case.spec.check_group(group, "")
    except (TypeError, ValueError):
        return False
    return True


# -- snapshots ------------------------------------------------------------------------
def _bytes(a) -> bytes:
    a = np.asarray(a)
    return a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()


def snapshot(opt, params=(), flats=()) -> dict:
    """Every byte the optimizer (and the caller's params) own: params, state arrays
    (master weights included), step counters, iteration count, last norm, group
    hyperparameters, and the FlatParams' data and grad buffers."""
    snap = {}
    for i, p in enumerate(params):
        snap[f"param{i}"] = _bytes(p)
    for i, stt in enumerate(opt._state):
        for k, v in (stt or {}).items():
            snap[f"state{i}.{k}"] = _bytes(v)
    snap["steps"] = _bytes(opt._steps)
    snap["iterations"] = repr(opt.iterations).encode()
    snap["last_grad_norm"] = repr(opt.last_grad_norm).encode()
    for gi, g in enumerate(opt.param_groups):
        snap[f"group{gi}"] = repr(sorted((k, v) for k, v in g.items() if k != "params")).encode()
        snap[f"group{gi}.params"] = repr([(id(p), p.shape) for p in g["params"]]).encode()
    for fi, f in enumerate(flats):
        snap[f"flat{fi}.data"] = _bytes(f.data)
        snap[f"flat{fi}.grad"] = _bytes(f.grad)
    return snap


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys(), f"{what}: state entries changed: " \
        f"{sorted(before.keys() ^ after.keys())}"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"{what}: changed {changed}"
    STATS["bytes_compared"] += sum(len(v) for v in before.values())
