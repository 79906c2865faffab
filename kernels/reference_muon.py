"""The NumPy reference of Muon (the ``"numpy"`` backend and the tests' oracle).

Written from torch.optim.Muon's published algorithm (torch 2.13 docs and
``torch/optim/_muon.py``), one matrix at a time, in the param's dtype, and independent of
kernels/muon.py: no stacking, tall matrices are transposed as torch does, the norm is
``np.linalg.norm``, the lr adjustment multiplies the lr.

For each param ``p`` (2-D) with gradient ``g`` and buffer ``buf``::

    buf = momentum * buf + (1 - momentum) * g          (torch: buf.lerp_(g, 1 - momentum))
    u = (1 - momentum) * g + momentum * buf if nesterov else buf
    X = u (transposed if rows > cols); X = X / max(||X||_F, eps)
    repeat ns_steps: A = X X^T; B = b A + c A A; X = a X + B X
    O = X (transposed back)
    p = p * (1 - lr * weight_decay) - lr * adjust(rows, cols) * O
"""
from __future__ import annotations

import math

import numpy as np


def zeropower(u, ns_coefficients, ns_steps, eps):
    """The Newton-Schulz orthogonalisation of one matrix ``u`` (a new array)."""
    a, b, c = ns_coefficients
    transposed = u.shape[0] > u.shape[1]
    x = u.T.copy() if transposed else u.copy()
    dtype = x.dtype.type
    x = x / dtype(max(float(np.linalg.norm(x)), eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = dtype(b) * gram + dtype(c) * (gram @ gram)
        x = dtype(a) * x + poly @ x
    return x.T if transposed else x


def adjusted_lr(lr, adjust_lr_fn, shape):
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def muon(params, grads, momentum_buffers, *, lr=1e-3, weight_decay=0.1, momentum=0.95,
         nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
         adjust_lr_fn=None, grad_scale=1.0):
    """One Muon step in place over lists of 2-D params, grads and momentum buffers."""
    for p, g, buf in zip(params, grads, momentum_buffers):
        if p.size == 0:
            continue
        dtype = p.dtype.type
        if grad_scale != 1.0:
            g = g * dtype(grad_scale)
        buf *= dtype(momentum)
        buf += dtype(1.0 - momentum) * g
        u = dtype(1.0 - momentum) * g + dtype(momentum) * buf if nesterov else buf
        o = zeropower(u, ns_coefficients, ns_steps, eps)
        p *= dtype(1.0 - lr * weight_decay)
        p -= dtype(adjusted_lr(lr, adjust_lr_fn, p.shape)) * o
