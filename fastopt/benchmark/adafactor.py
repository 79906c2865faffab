"""Adafactor against torch.optim.Adafactor on the same params, with its passes' roof.

Both optimizers step the same float32 (or float64) params with the same gradients, in
alternation (fastopt, torch, fastopt, ...), each step timed on its own; figures are
medians. ``threads`` gives both the same number of threads (torch.set_num_threads and
numba.set_num_threads). The roof is the time of the factored step's memory traffic with
trivial math: three parallel passes reading g and p (a sum), g (a sum), then p and g
(writing p): 6 words per parameter, 24 B in float32 (kernels/adafactor.py's passes: the
finish pass over the row and column factors is small and not counted).

Layouts: "matrices" (4 x 4096 x 4096: 64M params) and "gpt" (a GPT-2-like mix of 67M:
token and position embeddings, 4 blocks of attention and MLP matrices, biases and
LayerNorm vectors).

Hook for ``fastopt bench``: :func:`run` returns the record (a dict), :func:`lines` the
table's lines.

Run:  python -m fastopt.benchmark.adafactor [--layouts matrices,gpt] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _gpt(blocks=4, d=768, vocab=50257, ctx=1024):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


LAYOUTS = {
    "matrices": lambda: [(4096, 4096)] * 4,
    "gpt": _gpt,
    "quick": lambda: [(512, 512)] * 4 + [(1000, 64), (64,), (7,)],
}
BYTES_WORDS = 6          # words moved per factored parameter (see the module doc)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _roof_fns():
    import numba
    from numba import prange

    @numba.njit(parallel=True, cache=True)
    def read2(p, g):
        s = 0.0
        for i in prange(p.size):
            s += p[i] * p[i] + g[i] * g[i]
        return s

    @numba.njit(parallel=True, cache=True)
    def read1(g):
        s = 0.0
        for i in prange(g.size):
            s += g[i] * g[i]
        return s

    @numba.njit(parallel=True, cache=True)
    def update(p, g, a):
        for i in prange(p.size):
            p[i] = p[i] * a + g[i]

    return read2, read1, update


def roof_ms(n, dtype, repeats=5) -> float:
    """Median ms of the factored passes' traffic with trivial math over ``n`` elements."""
    read2, read1, update = _roof_fns()
    p = np.ones(n, dtype)
    g = np.ones(n, dtype)
    a = np.dtype(dtype).type(1.0)
    times = []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        read2(p, g)
        read1(g)
        update(p, g, a)
        if k:
            times.append(time.perf_counter() - t0)
    return _median(times) * 1e3


def run(layout="matrices", dtype="float32", repeats=5, warmup=1, threads=None, seed=0,
        hyper=None) -> dict:
    """Time ``repeats`` steps of fastopt.Adafactor (cpu backend) and torch.optim.Adafactor
    over ``layout``'s shapes, alternating, after ``warmup`` untimed steps of each."""
    import numba
    import torch

    import fastopt as fo

    if threads is not None:
        torch.set_num_threads(int(threads))
        numba.set_num_threads(int(threads))
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    shapes = LAYOUTS[layout]()
    hyper = dict(hyper or {})
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes]
    tparams = [torch.from_numpy(p.copy()).requires_grad_() for p in params]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g)
    mine = fo.Adafactor(params, backend="cpu", **hyper)
    theirs = torch.optim.Adafactor(tparams, **hyper)
    for _ in range(warmup):
        mine.step(grads)
        theirs.step()
    tf, tt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mine.step(grads)
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs.step()
        tt.append(time.perf_counter() - t0)
    n = sum(int(np.prod(s)) for s in shapes)
    itemsize = np.dtype(dtype).itemsize
    fastopt_ms, torch_ms = _median(tf) * 1e3, _median(tt) * 1e3
    roof = roof_ms(n, dtype, repeats)
    moved = BYTES_WORDS * itemsize * n
    return {"layout": layout, "dtype": str(np.dtype(dtype)), "params": n, "tensors": len(shapes),
            "threads": threads, "repeats": repeats, "fastopt_ms": fastopt_ms, "torch_ms": torch_ms,
            "speedup_vs_torch": torch_ms / fastopt_ms, "roof_ms": roof,
            "fraction_of_roof": roof / fastopt_ms, "bytes_per_param": BYTES_WORDS * itemsize,
            "fastopt_gbs": moved / fastopt_ms / 1e6, "fastopt_all_ms": [t * 1e3 for t in tf],
            "torch_all_ms": [t * 1e3 for t in tt]}


def lines(records) -> list:
    out = [f"{'layout':<10} {'dtype':<8} {'params':>10} {'fastopt ms':>11} {'torch ms':>9} "
           f"{'x torch':>8} {'roof ms':>8} {'of roof':>8}"]
    for r in records:
        out.append(f"{r['layout']:<10} {r['dtype']:<8} {r['params']:>10} {r['fastopt_ms']:>11.1f} "
                   f"{r['torch_ms']:>9.1f} {r['speedup_vs_torch']:>8.2f} {r['roof_ms']:>8.1f} "
                   f"{r['fraction_of_roof']:>8.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="matrices,gpt")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    names = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in names if x not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from {sorted(LAYOUTS)}")
    records = [run(x, args.dtype, args.repeats, threads=args.threads) for x in names]
    print("\n".join(lines(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
