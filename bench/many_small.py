"""Many small tensors, back to back: fastopt Adam against torch's fused Adam, in cache.

``fastopt bench`` interleaves its rows, so every step there starts from DRAM; this
script repeats each step on its own (the 1M parameters stay in cache), the way a
training loop calls it. Five rows: FlatParams, a list given the same gradient arrays at
every step, a list given new gradient arrays at every step (each one validated and its
address read), ``fastopt.functional.adam`` over caller-owned state given new gradient
arrays at every call, and torch.optim.Adam(fused=True).

Run:  python bench/many_small.py [--tensors 2000] [--size 512] [--steps 200]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastopt as fo


def median_ms(step, n):
    for _ in range(10):
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(args.size).astype(np.float32) for _ in range(args.tensors)]
    grads = [rng.standard_normal(args.size).astype(np.float32) * 1e-2 for _ in params]
    fresh = [[g.copy() for g in grads] for _ in range(4)]

    flat = fo.FlatParams([p.copy() for p in params])
    flat.grad[...] = np.concatenate(grads)
    flat_opt = fo.Adam(flat, lr=1e-3)
    listed = [p.copy() for p in params]
    list_opt = fo.Adam(listed, lr=1e-3)
    count = [0]

    def new_grads():
        count[0] += 1
        list_opt.step(fresh[count[0] % len(fresh)])

    # the functional form over caller-owned state, given new gradient arrays each call
    fn_params = [p.copy() for p in params]
    exp_avgs = [np.zeros_like(p) for p in params]
    exp_avg_sqs = [np.zeros_like(p) for p in params]

    def functional_new_grads():
        count[0] += 1
        fo.functional.adam(fn_params, fresh[count[0] % len(fresh)], exp_avgs, exp_avg_sqs,
                           step=count[0], lr=1e-3)

    rows = {"fastopt FlatParams": median_ms(flat_opt.step, args.steps),
            "fastopt list, same grads": median_ms(lambda: list_opt.step(grads), args.steps),
            "fastopt list, new grads": median_ms(new_grads, args.steps),
            "fastopt functional, new": median_ms(functional_new_grads, args.steps)}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tensors = [torch.tensor(p, requires_grad=True) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        torch_opt = torch.optim.Adam(tensors, lr=1e-3, fused=True)
        rows["torch fused"] = median_ms(torch_opt.step, max(10, args.steps // 4))
    print(f"Adam, {args.tensors} x {args.size} float32, steps back to back (median ms/step)")
    for name, ms in rows.items():
        ratio = f"{rows['torch fused'] / ms:6.1f}x" if "torch fused" in rows else ""
        print(f"{name:26s} {ms:8.3f}  {ratio}")


if __name__ == "__main__":
    main()
