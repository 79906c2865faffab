"""torch.optim.SparseAdam in vectorised NumPy: the independent reference of SparseAdam.

Written from torch 2.13's ``torch.optim.SparseAdam`` documentation and its functional
equations (``torch/optim/_functional.py: sparse_adam``), separately from
``kernels/sparse_adam.py``'s element: whole rows at once, in place, in the param's dtype
(Python float scalars keep float32 arrays in float32, NumPy 2 promotion).
"""
from __future__ import annotations

import math

import numpy as np


def coalesce(indices, rows):
    """Unique sorted indices with the rows of repeated indices summed (torch's coalesce)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    uniq, inverse = np.unique(indices, return_inverse=True)
    summed = np.zeros((uniq.size,) + rows.shape[1:], dtype=rows.dtype)
    np.add.at(summed, inverse.reshape(-1), rows)
    return uniq, summed


def sparse_adam(param, indices, rows, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, maximize=False):
    """One SparseAdam step of ``param`` at unique row ``indices`` with gradient ``rows``
    (``step`` counts this step). Rows not named are untouched; no rows, no change."""
    if len(indices) == 0:
        return
    lr, beta1, beta2, eps = float(lr), float(beta1), float(beta2), float(eps)
    g = -rows if maximize else rows
    m_old, v_old = exp_avg[indices], exp_avg_sq[indices]
    dm = (g - m_old) * (1.0 - beta1)
    dv = (g * g - v_old) * (1.0 - beta2)
    m, v = m_old + dm, v_old + dv
    exp_avg[indices] = m
    exp_avg_sq[indices] = v
    step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    param[indices] += -step_size * (m / (np.sqrt(v) + eps))


def sparse_adam_dense_rows(param, indices, rows, exp_avg, exp_avg_sq, **hypers):
    """The same step from raw (repeated, unsorted) indices: coalesced first, as torch does."""
    uniq, summed = coalesce(indices, rows)
    sparse_adam(param, uniq, summed, exp_avg, exp_avg_sq, **hypers)
