"""Adafactor in plain vectorised NumPy: the independent reference (and the "numpy" backend).

Written from torch.optim.Adafactor's documented algorithm (torch 2.13), not from the
compiled kernels. For each param with gradient ``G`` at step ``t`` (1-based):

- ``G = -grad`` when maximizing; ``beta2_hat_t = 1 - t**beta2_decay``;
  ``rho_t = min(lr, 1 / sqrt(t))``; ``alpha_t = max(eps2, RMS(theta_{t-1})) * rho_t``;
- decoupled weight decay: ``theta *= 1 - lr * weight_decay``;
- ``dim(G) >= 2`` (factored over the last two dims, leading dims are a batch):
  ``R = lerp(R, mean(G^2, -1), 1 - beta2_hat)``, ``C = lerp(C, mean(G^2, -2), ...)``,
  ``V = R C / max(mean(R, -2), eps1)``; otherwise ``V = lerp(V, G^2, 1 - beta2_hat)``;
- ``U = G / sqrt(max(V, eps1^2))``; ``U /= max(1, RMS(U) / d)``; ``theta -= alpha_t U``.

``eps1 = None`` means the machine epsilon of the param's dtype. Row and column means are
taken of float64 squares here (the kernels sum in their own ways), so the reference and
the kernels agree to rounding, not bit for bit.
"""
from __future__ import annotations

import math

import numpy as np


def _lerp(start, end, weight):
    """torch's lerp (``start + w (end - start)``, or from the end when ``w >= 0.5``)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def adafactor_tensor(param, grad, row_var, col_var, variance, *, step, lr, beta2_decay,
                     eps1, eps2, d, weight_decay, maximize):
    """One Adafactor step of one param, in place (its state: ``row_var`` and ``col_var``
    for ``param.ndim >= 2``, else ``variance``)."""
    dtype = param.dtype
    cast = dtype.type
    g = -grad if maximize else grad
    if eps1 is None:
        eps1 = float(np.finfo(dtype).eps)
    weight = float(step) ** beta2_decay
    rho = min(lr, 1.0 / math.sqrt(step))
    n = param.size
    rms_p = math.sqrt(float(np.sum(np.square(param, dtype=np.float64)))) / math.sqrt(n) if n else 0.0
    alpha = max(eps2, rms_p) * rho
    if weight_decay != 0:
        param *= cast(1.0 - lr * weight_decay)
    g64 = g.astype(np.float64)
    if param.ndim >= 2:
        sq = g64 * g64
        row_var[...] = _lerp(row_var, (sq.mean(axis=-1, keepdims=True)).astype(dtype), cast(weight))
        col_var[...] = _lerp(col_var, (sq.mean(axis=-2, keepdims=True)).astype(dtype), cast(weight))
        mean = np.maximum(row_var.astype(np.float64).mean(axis=-2, keepdims=True), eps1)
        v = (row_var.astype(np.float64) * col_var.astype(np.float64)) / mean
    else:
        variance[...] = _lerp(variance, (g64 * g64).astype(dtype), cast(weight))
        v = variance.astype(np.float64)
    u = g64 / np.sqrt(np.maximum(v, eps1 * eps1))
    rms_u = math.sqrt(float(np.sum(u * u))) / math.sqrt(n) if n else 0.0
    denom = max(1.0, rms_u / d)
    param -= (u * (alpha / denom)).astype(dtype)


def adafactor(params, grads, row_vars, col_vars, variances, steps, *, lr=1e-2,
              beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False):
    """Adafactor over lists (``None`` grads skip their param; ``steps[i]`` counts this
    step, 1-based; absent state entries are None)."""
    eps1, eps2 = eps
    for k, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        adafactor_tensor(p, g, row_vars[k], col_vars[k], variances[k], step=steps[k], lr=lr,
                         beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d,
                         weight_decay=weight_decay, maximize=maximize)
