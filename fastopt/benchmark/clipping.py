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
"""
from __future__ import annotations

import numpy as np

from .runner import Target, time_interleaved

MAX_NORM = 1.0


def _bytes(itemsize: int) -> dict:
    step = 7 * itemsize                   # Adam: read p, g, m, v; write p, m, v
    return {"fused": step + itemsize, "clip-then-step": step + 3 * itemsize,
            "torch clip + fused": step + 3 * itemsize}


def clip_targets(n_params: int, dtype="float32", seed: int = 0) -> dict:
    """Ready-to-time steps for the three variants over the same data."""
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


def run_clip_comparison(n_params: int, dtype="float32", repeats: int = 9, max_time_s=2.0) -> list:
    """Rows ``{variant, bytes_per_param, ms, gb_per_s, vs_fused}`` (median per-step times)."""
    targets = clip_targets(n_params, dtype)
    for t in targets.values():           # compile / warm up outside the timing
        t.step()
    samples = time_interleaved(list(targets.values()), repeats, max_time_s=max_time_s)
    medians = {name: float(np.median(times)) * 1e3 for name, (times, _) in zip(targets, samples)}
    reset_ms = medians.pop("reset")
    sizes = _bytes(np.dtype(dtype).itemsize)
    rows = []
    for name, total in medians.items():
        ms = max(total - reset_ms, 1e-6)
        rows.append({"variant": name, "bytes_per_param": sizes[name], "ms": ms,
                     "gb_per_s": sizes[name] * n_params / (ms * 1e6), "reset_ms": reset_ms})
    fused_ms = rows[0]["ms"]
    for r in rows:
        r["fused_speedup"] = r["ms"] / fused_ms
    return rows


def format_clip_rows(rows, n_params: int) -> str:
    lines = [f"== global-norm clipping + Adam: {n_params / 1e6:g}M params, FlatParams "
             f"(max_norm {MAX_NORM}; the per-step grad reset, {rows[0]['reset_ms']:.2f} ms, "
             "is subtracted) ==",
             f"{'variant':20} {'B/p':>4} {'ms/step':>9} {'GB/s':>6} {'fused is':>9}"]
    for r in rows:
        lines.append(f"{r['variant']:20} {r['bytes_per_param']:>4} {r['ms']:>9.2f} "
                     f"{r['gb_per_s']:>6.1f} {r['fused_speedup']:>8.2f}x")
    return "\n".join(lines)
