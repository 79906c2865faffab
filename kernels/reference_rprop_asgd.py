"""The NumPy reference of Rprop and ASGD, written from torch.optim's documented equations
(torch 2.13) in whole-array NumPy, one tensor at a time, in place; independent of the
element functions in ``kernels/rprop.py`` and ``kernels/asgd.py``.

Constants take the arrays' dtype before they meet them (``dt(etaplus)``), as torch writes
them into tensors of the param's dtype; Python floats combine with float32 arrays in
float32 (NumPy 2 promotion).
"""
from __future__ import annotations

import numpy as np


def rprop(params, grads, prevs, sizes, *, etas=(0.5, 1.2), step_sizes=(1e-6, 50),
          maximize=False):
    """torch.optim.Rprop. ``prevs`` and ``sizes`` are the state columns ``prev`` and
    ``step_size`` (a fresh ``step_size`` holds ``lr``)."""
    etaminus, etaplus = etas
    lo, hi = step_sizes
    for p, g, prev, size in zip(params, grads, prevs, sizes):
        dt = p.dtype.type
        d = np.array(g, copy=True)         # (0-d arrays stay arrays)
        if maximize:
            np.negative(d, out=d)
        with np.errstate(invalid="ignore", over="ignore"):
            prod = d * prev
            # sign(d * prev) -> etaplus / etaminus / 1 (a NaN product counts as 0)
            factor = np.where(prod > 0, dt(etaplus), np.where(prod < 0, dt(etaminus), dt(1)))
            size *= factor
            np.clip(size, dt(lo), dt(hi), out=size)
            d[factor == dt(etaminus)] = 0
            sign = np.where(d > 0, dt(1), np.where(d < 0, dt(-1), dt(0)))
            p += -sign * size
        prev[...] = d


def asgd_eta(lr, lambd, alpha, step):
    """ASGD's step size after step ``step``: ``lr / (1 + lambd lr t)^alpha`` (float64)."""
    return lr / (1 + lambd * lr * step) ** alpha


def asgd_mu(t0, step):
    """ASGD's averaging weight after step ``step``: ``1 / max(1, t - t0)`` (float64)."""
    return 1 / max(1, step - t0)


def asgd(params, grads, axs, *, eta, mu, lambd=1e-4, weight_decay=0.0, maximize=False):
    """torch.optim.ASGD, one step with the per-param ``eta`` and ``mu`` the previous step
    left (torch's state): decay, gradient step, then the running average ``ax``."""
    for p, g, ax in zip(params, grads, axs):
        d = -g if maximize else g
        if weight_decay != 0:
            d = d + weight_decay * p
        p *= 1 - lambd * eta
        p += -eta * d
        if mu != 1:
            ax += (p - ax) * mu
        else:
            ax[...] = p
