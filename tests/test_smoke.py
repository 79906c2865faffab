"""A first end-to-end check: each optimizer, list and FlatParams mode, against the reference."""
import numpy as np
import pytest

import fastopt as fo

CASES = [
    (fo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (fo.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    (fo.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (fo.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (fo.AdamW, dict(lr=0.01)),
]


@pytest.mark.parametrize("cls,kw", CASES, ids=[c.__name__ for c, _ in CASES])
def test_cpu_matches_reference_list_and_flat(cls, kw):
    rng = np.random.default_rng(0)
    shapes = [(0,), (1,), (5, 3), (70_001,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = [a.copy() for a in init]
    lst = [a.copy() for a in init]
    flat = fo.FlatParams(init)
    opt_ref = cls(ref, backend="numpy", **kw)
    opt_lst = cls(lst, backend="cpu", **kw)
    opt_flat = cls(flat, backend="cpu", **kw)
    for _ in range(20):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt_ref.step(grads)
        opt_lst.step(grads)
        for g, fg in zip(grads, flat.grads):
            fg[...] = g
        opt_flat.step()
    for r, a, b in zip(ref, lst, flat.params):
        scale = max(np.linalg.norm(r), 1e-30)
        assert np.linalg.norm(a - r) / scale < 1e-6
        assert np.linalg.norm(b - r) / scale < 1e-6
