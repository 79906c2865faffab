"""Lookahead(AdamW) against pytorch_optimizer.Lookahead(torch.optim.AdamW), with the roof
of its access pattern.

``fastopt.Lookahead(fastopt.AdamW(flat), k=5, alpha=0.5)`` over a FlatParams of the
layout (``fastopt bench``'s "large" and "transformer" layouts), and pytorch_optimizer's
Lookahead around ``torch.optim.AdamW`` (fused where torch has it, else foreach) over
tensors of the same shapes and values, both with ``lr=1e-3, weight_decay=1e-2``.

Bytes a step moves, per parameter: AdamW's fused pass (read p, g, exp_avg, exp_avg_sq;
write p and both moments: 7 words) and, every k-th step, the slow-weight pass (read p
and the slow weights, write both: 4 words): ``(7 + 4 / k) * itemsize``, 31.2 B in float32
at k=5. One timed sample is k consecutive steps, so each holds exactly one slow pass;
ms/step is the sample over k.

The roof runs the same passes with trivial math through the same CPU driver on one
contiguous buffer per array: k times the roof element with AdamW's two state columns,
then once with the slow weights as its one state column and the params as its gradient
column (the slow pass's table: kernels/lookahead.py), as :mod:`fastopt.benchmark.roof`
does for the table's rows.

fastopt, pytorch_optimizer and the roof are timed interleaved
(:func:`fastopt.benchmark.runner.time_interleaved`), medians of ``repeats`` samples;
``threads`` sets both Numba's and torch's thread count (restored after).

Hook for ``fastopt bench --optimizers lookahead``: :func:`run` returns a record (a
dict), :func:`lines` the table's lines.

Run:  python -m fastopt.benchmark.lookahead [--size 64M] [--layouts large,transformer] [--k 5]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

K, ALPHA = 5, 0.5
HYPER = dict(lr=1e-3, weight_decay=1e-2)
INNER_WORDS, SLOW_WORDS = 7, 4


def bytes_per_param(dtype="float32", k=K) -> float:
    """Bytes one step moves per parameter, averaged over k steps (see the module doc)."""
    return (INNER_WORDS + SLOW_WORDS / k) * np.dtype(dtype).itemsize


def _k_steps(step, k):
    def run():
        for _ in range(k):
            step()
    return run


def _fastopt_target(data, k, alpha):
    import fastopt as fo

    from .runner import Target
    flat = fo.FlatParams(data.views(data.params))
    flat.grad[...] = data.grads
    opt = fo.Lookahead(fo.AdamW(flat, backend="cpu", **HYPER), k=k, alpha=alpha)
    return Target(_k_steps(opt.step, k), keep=(flat, opt), numba_cpu=True)


def _torch_target(data, k, alpha):
    """pytorch_optimizer.Lookahead around torch.optim.AdamW (fused, else foreach), or
    None when torch or pytorch_optimizer is not importable."""
    try:
        import pytorch_optimizer
        import torch
    except ImportError:
        return None

    from .runner import Target, _torch_params
    params = _torch_params(data)
    errors = []
    for impl in ("fused", "foreach"):
        try:
            inner = torch.optim.AdamW(params, **HYPER, **{impl: True})
            opt = pytorch_optimizer.Lookahead(inner, k=k, alpha=alpha)
            opt.step()
        except (RuntimeError, TypeError, ValueError) as exc:
            errors.append(f"{impl}: {exc}")
            continue
        return Target(_k_steps(opt.step, k), mode=impl, keep=(params, opt), settle_s=0.03)
    raise RuntimeError("; ".join(errors))


def _roof_target(data, k):
    """k roof steps with AdamW's two state columns, then one over (p, slow)."""
    from fastopt.kernels import cpu, roof

    from .runner import Target
    p, g = data.params.copy(), data.grads.copy()
    moments = ([np.zeros_like(p)], [np.zeros_like(p)], None)
    slow = ([p.copy()], None, None)
    inner = cpu.ChunkTable([p], [g], moments)
    slow_pass = cpu.ChunkTable([p], [p], slow)
    scalars = roof.roof_scalars(p.dtype.type)

    def step():
        for _ in range(k):
            cpu.run(roof.roof_element, inner, scalars)
        cpu.run(roof.roof_element, slow_pass, scalars)
    return Target(step, keep=(inner, slow_pass, moments, slow), numba_cpu=True)


def run(layout="large", size=64_000_000, dtype="float32", repeats=7, threads=None, seed=0,
        k=K, alpha=ALPHA) -> dict:
    """Time fastopt's and pytorch_optimizer's Lookahead(AdamW) and the roof on ``layout``.
    Without torch or pytorch_optimizer the record's torch figures are None."""
    from .runner import LayoutData, median_ms, thread_count
    data = LayoutData(layout, size, dtype, seed)
    with thread_count(threads) as used:
        torch_target = _torch_target(data, k, alpha)
        ms, every = median_ms({"fastopt": _fastopt_target(data, k, alpha), "torch": torch_target,
                               "roof": _roof_target(data, k)}, repeats, per_sample=k)
    per_param = bytes_per_param(dtype, k)
    moved = per_param * data.n_params
    torch_ms = ms.get("torch")
    return {"optimizer": "lookahead", "layout": layout, "dtype": str(np.dtype(dtype)),
            "params": data.n_params, "tensors": data.n_tensors, "k": k, "alpha": alpha,
            "threads": used, "repeats": repeats,
            "torch_mode": None if torch_target is None else torch_target.mode,
            "bytes_per_param": per_param, "fastopt_ms": ms["fastopt"], "torch_ms": torch_ms,
            "roof_ms": ms["roof"], "fastopt_gbs": moved / ms["fastopt"] / 1e6,
            "roof_gbs": moved / ms["roof"] / 1e6, "fraction_of_roof": ms["roof"] / ms["fastopt"],
            "speedup_vs_torch": None if torch_ms is None else torch_ms / ms["fastopt"],
            "all_ms": every}


def lines(records) -> list:
    from .report import _num, _table
    header = ["layout", "dtype", "params", "B/param", "fastopt ms", "GB/s", "roof ms", "of roof",
              "torch ms", "x torch"]
    rows = [[r["layout"], r["dtype"], str(r["params"]), _num(r["bytes_per_param"], ".1f"),
             _num(r["fastopt_ms"], ".1f"), _num(r["fastopt_gbs"], ".1f"), _num(r["roof_ms"], ".1f"),
             _num(r["fraction_of_roof"], ".2f"), _num(r["torch_ms"], ".1f"),
             _num(r["speedup_vs_torch"], ".2f")] for r in records]
    return _table(header, rows, "<<>>>>>>>>")


def title(dtype: str, k=K, alpha=ALPHA) -> str:
    return (f"Lookahead(AdamW, k={k}, alpha={alpha}) vs pytorch_optimizer.Lookahead(torch.optim.AdamW) "
            f"({dtype}; ms per step over {k}-step samples; bytes: AdamW's pass + 1/{k} of the "
            f"slow-weight pass, {bytes_per_param(dtype, k):g} B/param; roof: the same passes "
            "with trivial math)")


def main(argv=None) -> int:
    from .cases import parse_layouts, parse_size
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M")
    ap.add_argument("--layouts", default="large,transformer")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--alpha", type=float, default=ALPHA)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    print(title(args.dtype, args.k, args.alpha))
    records = [run(x, size, args.dtype, args.repeats, args.threads, k=args.k, alpha=args.alpha)
               for x in parse_layouts(args.layouts)]
    print("\n".join(lines(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
