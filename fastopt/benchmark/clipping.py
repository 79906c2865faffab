"""Fused gradient clipping against clip-then-step, in fastopt and in torch.

Three ways to run "clip the global 2-norm, then Adam" on one FlatParams:

- fused: ``Adam(max_grad_norm=...)``: one reduction pass (read g) and the step pass
  with the clip coefficient applied as gradients are read: 4 + 28 = 32 B/param (fp32).
- clip-then-step: ``fo.clip_grad_norm`` (read g; read and write g) and then the step:
  4 + 8 + 28 = 40 B/param.
- torch: ``torch.nn.utils.clip_grad_norm_`` then ``torch.optim.Adam(fused=True)``: the
  same 40 B/param in its own kernels.

Clipping scales the gradients down, so each step first resets them from a copy (else
later steps would find nothing to clip). That copy is timed alone too and subtracted:
the figures are for clipping and stepping only.

``fastopt bench`` runs this comparison when ``adam`` is among its optimizers (float32).
"""
from __future__ import annotations

import math

import numpy as np

from .cases import format_count
from .runner import Target, ratio_is_uncertain, time_interleaved

MAX_NORM = 1.0


def _bytes(itemsize: int) -> dict:
    step = 7 * itemsize                   # Adam: read p, g, m, v; write p, m, v
    return {"fused": step + itemsize, "clip-then-step": step + 3 * itemsize,
            "torch clip + fused": step + 3 * itemsize}


VARIANTS = ("fused", "clip-then-step", "torch clip + fused")


def clip_targets(n_params: int, dtype="float32", seed: int = 0, torch: bool = True) -> dict:
    """Ready-to-time steps for the three variants over the same data (the torch one only
    with ``torch=True`` and torch importable), and the gradient reset ``"reset"``."""
    import fastopt as fo

    rng = np.random.default_rng(seed)
    init = rng.standard_normal(n_params, dtype=np.float32).astype(dtype)
    grads = rng.standard_normal(n_params, dtype=np.float32).astype(dtype)   # norm >> 1
    targets = {}
    sink = np.empty_like(grads)
    targets["reset"] = Target(lambda: np.copyto(sink, grads), keep=sink)

    fused = fo.FlatParams([init])
    fused_opt = fo.Adam(fused, lr=1e-6, max_grad_norm=MAX_NORM)

    def fused_step():
        fused.grad[...] = grads
        fused_opt.step()
    targets["fused"] = Target(fused_step, keep=(fused, fused_opt))

    plain = fo.FlatParams([init])
    plain_opt = fo.Adam(plain, lr=1e-6)

    def clip_then_step():
        plain.grad[...] = grads
        fo.clip_grad_norm(plain.grad, MAX_NORM)
        plain_opt.step()
    targets["clip-then-step"] = Target(clip_then_step, keep=(plain, plain_opt))

    if not torch:
        return targets
    try:
        import torch
    except ImportError:
        return targets
    tp = torch.from_numpy(init.copy())
    tp.grad = torch.empty_like(tp)
    tg = torch.from_numpy(grads)
    t_opt = torch.optim.Adam([tp], lr=1e-6, fused=True)

    def torch_step():
        tp.grad.copy_(tg)
        torch.nn.utils.clip_grad_norm_([tp], MAX_NORM)
        t_opt.step()
    targets["torch clip + fused"] = Target(torch_step, keep=(tp, t_opt))
    return targets


def _half_iqr(times) -> float:
    q25, q75 = np.percentile(times, [25, 75])
    return float(q75 - q25) / 2


def run_clip_comparison(n_params: int, dtype="float32", repeats: int = 9, max_time_s=2.0,
                        torch: bool = True) -> list:
    """Rows ``{variant, bytes_per_param, ms, spread, gb_per_s, reset_ms, fused_speedup,
    uncertain}``: median per-step times less the gradient reset; ``spread`` is half the
    interquartile range (of the variant and of the reset, combined) over ``ms``;
    ``uncertain`` says the ratio to the fused variant is within the noise
    (:func:`~fastopt.benchmark.runner.ratio_is_uncertain`)."""
    targets = clip_targets(n_params, dtype, torch=torch)
    for t in targets.values():           # compile / warm up outside the timing
        t.step()
    samples = time_interleaved(list(targets.values()), repeats, max_time_s=max_time_s)
    times = {name: times for name, (times, _) in zip(targets, samples)}
    reset = times.pop("reset")
    reset_ms, reset_iqr = float(np.median(reset)) * 1e3, _half_iqr(reset) * 1e3
    sizes = _bytes(np.dtype(dtype).itemsize)
    rows = []
    for name, t in times.items():
        ms = max(float(np.median(t)) * 1e3 - reset_ms, 1e-6)
        rows.append({"variant": name, "bytes_per_param": sizes[name], "ms": ms,
                     "spread": math.hypot(_half_iqr(t) * 1e3, reset_iqr) / ms,
                     "gb_per_s": sizes[name] * n_params / (ms * 1e6), "reset_ms": reset_ms})
    fused = rows[0]
    for r in rows:
        r["fused_speedup"] = r["ms"] / fused["ms"]
        r["uncertain"] = r is not fused and ratio_is_uncertain(r["fused_speedup"], r["spread"],
                                                               fused["spread"])
    return rows


def format_clip_rows(rows, n_params: int) -> str:
    lines = [f"== global-norm clipping + Adam: {format_count(n_params)} params, FlatParams "
             f"(max_norm {MAX_NORM}; the per-step grad reset, {rows[0]['reset_ms']:.2f} ms, "
             "is subtracted) ==",
             f"{'variant':20} {'B/p':>4} {'ms/step':>9} {'+-':>4} {'GB/s':>6} {'fused is':>9}"]
    for r in rows:
        ratio = f"{'~' if r.get('uncertain') else ''}{r['fused_speedup']:.2f}x"
        lines.append(f"{r['variant']:20} {r['bytes_per_param']:>4} {r['ms']:>9.2f} "
                     f"{r.get('spread', 0) * 100:>3.0f}% {r['gb_per_s']:>6.1f} {ratio:>9}")
    return "\n".join(lines)
