"""The NumPy reference: every optimizer step written from the published equations.

This module is the test oracle and the benchmark baseline, and it is the ``"numpy"``
backend. It is written separately from the element functions (whole-array NumPy, one
tensor at a time, in place) so a bug in one is not silently shared by the other. The
equations are torch.optim's (torch 2.13 documentation), whose defaults and state names
fastopt follows. Arrays are updated in place; Python float hyperparameters combine with
float32 arrays in float32 (NumPy 2 promotion rules).
"""
from __future__ import annotations

import numpy as np


def _l2(grad, param, weight_decay, maximize):
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    return g


def sgd(params, grads, momentum_buffers, *, first_step, lr, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False):
    """torch.optim.SGD. ``momentum_buffers[i]`` is updated in place (ignored if momentum == 0);
    ``first_step[i]`` says that buffer ``i`` holds nothing yet."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d_p = _l2(g, p, weight_decay, maximize)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step[i]:
                buf[...] = d_p
            else:
                buf *= momentum
                buf += (1 - dampening) * d_p
            d_p = d_p + momentum * buf if nesterov else buf
        p -= lr * d_p


def adagrad(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """torch.optim.Adagrad; ``step`` is the 1-based step count after this update."""
    clr = lr / (1 + (step - 1) * lr_decay)
    for p, g, acc in zip(params, grads, state_sums):
        d_p = _l2(g, p, weight_decay, maximize)
        acc += d_p * d_p
        p -= clr * (d_p / (np.sqrt(acc) + eps))


def rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr=1e-2, alpha=0.99,
            eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    """torch.optim.RMSprop."""
    for i, (p, g, sq) in enumerate(zip(params, grads, square_avgs)):
        d_p = _l2(g, p, weight_decay, maximize)
        sq *= alpha
        sq += (1 - alpha) * d_p * d_p
        if centered:
            ga = grad_avgs[i]
            ga += (1 - alpha) * (d_p - ga)
            avg = np.sqrt(sq - ga * ga) + eps
        else:
            avg = np.sqrt(sq) + eps
        if momentum > 0:
            buf = momentum_buffers[i]
            buf *= momentum
            buf += d_p / avg
            p -= lr * buf
        else:
            p -= lr * (d_p / avg)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
         beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """torch.optim.Adam (and AdamW with ``decoupled_weight_decay=True``)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if decoupled_weight_decay:
            p *= 1 - lr * weight_decay
            d_p = _l2(g, p, 0.0, maximize)
        else:
            d_p = _l2(g, p, weight_decay, maximize)
        m += (1 - beta1) * (d_p - m)
        v *= beta2
        v += (1 - beta2) * d_p * d_p
        if amsgrad:
            np.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        else:
            second = v
        denom = np.sqrt(second) / np.sqrt(bc2) + eps
        p -= (lr / bc1) * (m / denom)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False):
    """torch.optim.AdamW: Adam with weight decay applied to the parameter, not the gradient."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=True)


def sparse_adam(param, indices, rows, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, maximize=False):
    """torch.optim.SparseAdam on unique row ``indices`` with gradient ``rows``: only those
    rows of the moments and the param change."""
    g = -rows if maximize else rows
    m = exp_avg[indices]
    v = exp_avg_sq[indices]
    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    exp_avg[indices] = m
    exp_avg_sq[indices] = v
    step_size = lr * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    param[indices] -= step_size * (m / (np.sqrt(v) + eps))


def roof(params, grads, states):
    """The roof's access pattern in NumPy: read p, g, states; write p, states (trivial math)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        p += g
        for s in states:
            s[i] += g
