"""The learning-rate range test: sweep the lr upwards exponentially and watch the loss.

Train for a few steps with the learning rate growing geometrically from ``start_lr`` to
``end_lr``, record the loss after each step's forward pass, smooth it, stop when it
diverges, and suggest a learning rate. Params and optimizer state are restored after.

References:
  L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017
  (the range test). The exponential sweep, the bias-corrected exponential smoothing
  of the loss, the divergence stop (smoothed loss above ``diverge_threshold`` times the
  best) and the steepest-descent suggestion follow the fastai ``lr_find`` /
  ``torch-lr-finder`` practice (S. Gugger, "How Do You Find A Good Learning Rate", 2017).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import _validate


@dataclass
class LRRangeResult:
    """What :func:`lr_range_test` saw.

    Attributes:
      lrs: the learning rate of each step taken.
      losses: the raw loss at each step (computed before that step's update).
      smoothed: the bias-corrected exponential moving average of ``losses``.
      suggested_lr: the lr where the smoothed loss falls fastest against log10(lr)
        before its minimum (None when too few steps were recorded to tell).
      min_loss_lr: the lr of the smallest smoothed loss; ``min_loss_lr / 10`` is the
        other common rule of thumb.
      diverged: True when the sweep stopped early because the loss blew up.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggested_lr: float | None
    min_loss_lr: float
    diverged: bool
    plot_path: str | None = field(default=None)


def lr_range_test(loss_and_grads_fn, optimizer, start_lr=1e-7, end_lr=10.0, num_steps=100,
                  beta=0.98, diverge_threshold=4.0, skip_start=10, skip_end=5,
                  plot=None) -> LRRangeResult:
    """Run the learning-rate range test on ``optimizer`` and restore it afterwards.

    Step ``i`` (0-based) sets every param group's lr to
    ``start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))``, calls
    ``loss, grads = loss_and_grads_fn()`` and steps with ``grads`` (None: the
    optimizer's FlatParams grads, which the function filled in). The loss is smoothed
    as ``avg = beta * avg + (1 - beta) * loss``, ``smoothed = avg / (1 - beta^(i+1))``.
    The sweep stops when the loss is not finite or ``smoothed > diverge_threshold * best``.

    The suggestion is the lr at the most negative slope of the smoothed loss against
    ``log10(lr)`` (a central difference over a quarter decade each side), searched from
    point ``skip_start`` up to the smoothed minimum and not in the last ``skip_end``
    points (noisy warmup and the blow-up). Params (in place), the
    optimizer state and the groups' lrs are restored afterwards, even on an exception.

    Args:
      loss_and_grads_fn: ``() -> (loss, grads)`` at the current params.
      optimizer: a fastopt optimizer.
      start_lr, end_lr: the sweep's range (0 < start_lr < end_lr).
      num_steps: steps in the full sweep (>= 2).
      beta: loss smoothing factor in [0, 1).
      diverge_threshold: stop when the smoothed loss exceeds this multiple of the best (> 1).
      skip_start, skip_end: points left out of the suggestion.
      plot: a path: save a PNG of smoothed loss against lr there (needs matplotlib).

    Returns:
      An :class:`LRRangeResult`.
    """
    what = "lr_range_test"
    start_lr = _validate.number("start_lr", start_lr, low=0.0, low_open=True, where=what)
    end_lr = _validate.number("end_lr", end_lr, low=start_lr, low_open=True, where=what)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"{what}: num_steps must be an int >= 2, got {num_steps!r}")
    beta = _validate.number("beta", beta, low=0.0, high=1.0, high_open=True, where=what)
    diverge_threshold = _validate.number("diverge_threshold", diverge_threshold, low=1.0,
                                         low_open=True, where=what)
    for name, v in (("skip_start", skip_start), ("skip_end", skip_end)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{what}: {name} must be an int >= 0, got {v!r}")
    if not callable(loss_and_grads_fn):
        raise TypeError(f"{what}: loss_and_grads_fn must be callable")

    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_params = [p.copy() for p in params]
    saved_state = optimizer.state_dict()
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    lrs, losses, smoothed = [], [], []
    diverged = False
    try:
        avg, best = 0.0, math.inf
        ratio = end_lr / start_lr
        for i in range(int(num_steps)):
            lr = start_lr * ratio ** (i / (num_steps - 1))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, grads = loss_and_grads_fn()
            loss = float(loss)
            if not math.isfinite(loss):
                diverged = True
                break
            avg = beta * avg + (1.0 - beta) * loss
            s = avg / (1.0 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(s)
            if i > 0 and s > diverge_threshold * best:
                diverged = True
                break
            best = min(best, s)
            optimizer.step(grads)
    finally:
        for p, saved in zip(params, saved_params):
            p[...] = saved
        optimizer.load_state_dict(saved_state)
        for g, lr in zip(optimizer.param_groups, saved_lrs):
            g["lr"] = lr

    lrs_a, losses_a, smoothed_a = np.array(lrs), np.array(losses), np.array(smoothed)
    result = LRRangeResult(lrs_a, losses_a, smoothed_a, _steepest(lrs_a, smoothed_a, skip_start, skip_end),
                           float(lrs_a[np.argmin(smoothed_a)]) if lrs else math.nan, diverged)
    if plot is not None:
        result.plot_path = _plot(result, plot)
    return result


def _steepest(lrs, smoothed, skip_start, skip_end) -> float | None:
    """The lr where the smoothed loss falls fastest against log10(lr), before its minimum.

    The slope at point i is the central difference over i - k .. i + k with k steps per
    quarter decade of lr (at least 1): a single-step gradient is mostly minibatch noise.
    """
    stop = min(len(lrs) - skip_end, int(np.argmin(smoothed)) + 1) if len(lrs) else 0
    if stop - skip_start < 3:
        return None
    x = np.log10(lrs)
    per_decade = (len(x) - 1) / max(x[-1] - x[0], 1e-12)
    k = max(1, int(round(per_decade / 4)))
    best, at = math.inf, None
    for i in range(skip_start, stop):
        lo, hi = max(i - k, 0), min(i + k, len(x) - 1)
        slope = (smoothed[hi] - smoothed[lo]) / (x[hi] - x[lo])
        if slope < best:
            best, at = slope, i
    return float(lrs[at])


def _plot(result: LRRangeResult, path) -> str:
    import os

    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, lw=2, label="smoothed loss")
    if result.suggested_lr is not None:
        ax.axvline(result.suggested_lr, color="C3", ls="--",
                   label=f"suggested lr {result.suggested_lr:.2e}")
    if result.smoothed.size:
        # Frame the smoothed curve: the raw loss's blow-up would flatten everything else.
        lo, hi = float(result.smoothed.min()), float(result.smoothed.max())
        margin = 0.05 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - margin, hi + margin)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path
