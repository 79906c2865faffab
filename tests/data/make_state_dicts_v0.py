"""Writes tests/data/state_dicts_v0/*.npz with fastopt as it was before the spec redesign
(commit a058636): for each optimizer, its state dict after 3 steps and the params after 5.

Run from a checkout of that commit (see tests/test_state_dict_compat.py); kept for the
record of how the files were made, not run by the tests.
"""
import sys
from pathlib import Path

import numpy as np

import fastopt as fo

OUT = Path(sys.argv[1])
SHAPES = [(3, 5), (7,), (1,)]
ROWS = {
    "SGD": dict(lr=0.01, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01),
    "Adamax": dict(lr=0.01, weight_decay=0.1),
    "NAdam": dict(lr=0.01, momentum_decay=0.1),
    "RAdam": dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
    "Adadelta": dict(lr=0.5),
    "Lion": dict(lr=1e-3),
    "LAMB": dict(lr=1e-2, weight_decay=0.1),
    "LARS": dict(lr=1.0, nesterov=True),
}


def grads(step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s) for s in SHAPES]


def run(cls, hp, dtype, master=False):
    rng = np.random.default_rng(7)
    store = np.float16 if master else dtype
    params = [rng.standard_normal(s).astype(store) for s in SHAPES]
    opt = cls(params, backend="numpy", master_weights=master, **hp)
    for step in range(1, 6):
        gs = [g.astype(store) for g in grads(step)]
        if step == 2:
            gs[1] = None            # a param that skips a step: differing step counts
        opt.step(gs)
        if step == 3:
            sd = opt.state_dict()
            after3 = [p.copy() for p in params]
    return sd, after3, params


for name, hp in ROWS.items():
    for dtype in (np.float32, np.float64):
        sd, after3, after5 = run(getattr(fo, name), hp, dtype)
        fo.save(OUT / f"{name}-{np.dtype(dtype).name}.npz",
                {"state_dict": sd, "after3": after3, "after5": after5})
sd, after3, after5 = run(fo.Adam, dict(lr=0.01), np.float32, master=True)
fo.save(OUT / "Adam-master-float16.npz", {"state_dict": sd, "after3": after3, "after5": after5})
