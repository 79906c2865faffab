"""Muon against torch.optim.Muon on the same matrices, time split into Newton-Schulz and
elementwise work.

Both optimizers step the same float32 (or float64) matrices with the same gradients, in
alternation (fastopt, torch, fastopt, ...), each step timed on its own; the figures are
medians. fastopt's split comes from ``Muon.phase_times`` (the fused momentum pass, the
batched Newton-Schulz matmuls, the fused update pass); torch's from timing its
``_zeropower_via_newtonschulz`` (everything else in its step is its elementwise work and
Python). torch runs Newton-Schulz in bfloat16, fastopt in the params' dtype: see
kernels/muon.py. ``threads`` gives both the same number of threads: torch's
(``torch.set_num_threads``) and the BLAS's that NumPy's matmul uses (threadpoolctl, which
scikit-learn brings; without it the BLAS keeps its own count, and the record says so).
On a loaded machine a multithreaded BLAS collapses (threads wait on descheduled
siblings: a 512^3 float32 product took 22 ms on 1 thread and 160-480 ms on 2 of a
2-core machine under a load of 8), so compare at 1 thread there.

Hook for ``fastopt bench``: :func:`run` returns the record (a dict), :func:`lines` the
table's lines.

Run:  python -m fastopt.benchmark.muon [--matrices 8x1024x1024,4x1024x4096] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MATRICES = "8x1024x1024,4x1024x4096"
QUICK_MATRICES = "8x256x256,4x256x1024"


def parse_matrices(text: str) -> list:
    """``"8x1024x1024,4x1024x4096"`` -> ``[(1024, 1024)] * 8 + [(1024, 4096)] * 4``."""
    shapes = []
    for part in text.split(","):
        try:
            k, m, n = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"matrices: expected COUNTxROWSxCOLS, got {part!r}") from None
        if k < 1 or m < 1 or n < 1:
            raise ValueError(f"matrices: counts and sizes must be positive, got {part!r}")
        shapes += [(m, n)] * k
    return shapes


# torch.optim.Muon runs Newton-Schulz in bfloat16. Where torch's bfloat16 CPU matmul is
# this many times slower than its float32 one (no native path: AVX2-only CPUs, measured
# 29x on an AMD EPYC), the default matrices take minutes per torch step.
SLOW_BFLOAT16 = 8.0


def bfloat16_slowdown(n: int = 256) -> float:
    """How many times longer torch's ``n x n`` bfloat16 matmul takes than its float32 one
    on this CPU (the best of 3 of each, after one untimed call)."""
    import torch

    def best(dtype):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def matrices_for(big: bool, slowdown=bfloat16_slowdown) -> tuple:
    """The matrices ``fastopt bench`` times (``DEFAULT_MATRICES`` at --size 64M or more,
    ``QUICK_MATRICES`` below it) and a note, or None: at 64M, a CPU whose bfloat16 matmul
    is over :data:`SLOW_BFLOAT16` times slower than float32 gets the quick matrices."""
    if not big:
        return QUICK_MATRICES, None
    ratio = slowdown()
    if ratio <= SLOW_BFLOAT16:
        return DEFAULT_MATRICES, None
    return QUICK_MATRICES, (
        f"note: muon: torch's bfloat16 matmul takes {ratio:.0f}x its float32 time on this CPU "
        f"(torch.optim.Muon's Newton-Schulz runs in bfloat16), so Muon runs on {QUICK_MATRICES} "
        f"instead of {DEFAULT_MATRICES}; python -m fastopt.benchmark.muon --matrices ... times any size")


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def run(shapes, dtype="float32", repeats=5, warmup=1, threads=None, seed=0, hyper=None) -> dict:
    """Time ``repeats`` steps of fastopt.Muon and torch.optim.Muon over ``shapes``,
    alternating, after ``warmup`` untimed steps of each. Returns the record: medians in ms
    (total and per phase) for each, the speed-up, and the setting."""
    import torch

    limits, blas_threads, torch_threads = None, None, torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
        try:
            from threadpoolctl import threadpool_limits
            limits = threadpool_limits(int(threads), user_api="blas")
            blas_threads = int(threads)
        except ImportError:
            pass
    try:
        return _run(shapes, dtype, repeats, warmup, seed, hyper, blas_threads)
    finally:
        torch.set_num_threads(torch_threads)
        if limits is not None:
            limits.restore_original_limits()


def _run(shapes, dtype, repeats, warmup, seed, hyper, blas_threads):
    import numpy as np
    import torch
    from torch.optim import _muon as torch_muon

    from fastopt.muon import Muon

    hyper = dict(lr=0.02, weight_decay=0.01, **(hyper or {}))
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    params = [rng.standard_normal(s).astype(dt) * dt.type(0.02) for s in shapes]
    grads = [rng.standard_normal(s).astype(dt) for s in shapes]
    mine = [p.copy() for p in params]
    opt = Muon(mine, **hyper)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    for t, g in zip(tparams, grads):
        t.grad = torch.tensor(g)
    topt = torch.optim.Muon(tparams, **hyper)

    ns_time = [0.0]
    original = torch_muon._zeropower_via_newtonschulz

    def timed_ns(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        ns_time[0] += time.perf_counter() - t0
        return out

    rows = {"fastopt": {"total": [], "momentum": [], "newton_schulz": [], "update": [],
                        "elementwise": [], "other": []},
            "torch": {"total": [], "newton_schulz": [], "elementwise": []}}
    torch_muon._zeropower_via_newtonschulz = timed_ns
    try:
        for i in range(warmup + repeats):
            opt.phase_times = {}
            t0 = time.perf_counter()
            opt.step(grads)
            total = time.perf_counter() - t0
            if i >= warmup:
                r = rows["fastopt"]
                r["total"].append(total)
                phases = {k: opt.phase_times.get(k, 0.0) for k in ("momentum", "newton_schulz", "update")}
                for k, v in phases.items():
                    r[k].append(v)
                r["elementwise"].append(phases["momentum"] + phases["update"])
                r["other"].append(total - sum(phases.values()))
            ns_time[0] = 0.0
            t0 = time.perf_counter()
            topt.step()
            total = time.perf_counter() - t0
            if i >= warmup:
                r = rows["torch"]
                r["total"].append(total)
                r["newton_schulz"].append(ns_time[0])
                r["elementwise"].append(total - ns_time[0])
    finally:
        torch_muon._zeropower_via_newtonschulz = original
        opt.phase_times = None
    med = {who: {k: _median(v) * 1e3 for k, v in r.items()} for who, r in rows.items()}
    f, t = med["fastopt"], med["torch"]
    return {
        "shapes": [list(s) for s in shapes], "dtype": dt.name, "repeats": repeats,
        "threads": torch.get_num_threads(), "blas_threads": blas_threads or "default",
        "params": int(sum(m * n for m, n in shapes)),
        "fastopt_ms": f, "torch_ms": t,
        "samples_ms": {who: {k: [x * 1e3 for x in v] for k, v in r.items()} for who, r in rows.items()},
        "speedup": t["total"] / f["total"] if f["total"] else float("nan"),
        "ns_precision": {"fastopt": dt.name, "torch": "bfloat16"},
    }


def lines(record) -> list:
    """The record as a small table: ms per step, total and split."""
    f, t = record["fastopt_ms"], record["torch_ms"]
    shapes = {}
    for s in record["shapes"]:
        shapes[tuple(s)] = shapes.get(tuple(s), 0) + 1
    what = ", ".join(f"{k}x{m}x{n}" for (m, n), k in shapes.items())
    out = [f"Muon, {what} ({record['params'] / 1e6:.1f}M params, {record['dtype']}, "
           f"torch {record['threads']} threads, BLAS {record['blas_threads']}, median of {record['repeats']} alternated steps)",
           f"{'':<22}{'total ms':>10}{'NS ms':>10}{'elementwise ms':>16}",
           f"{'fastopt.Muon':<22}{f['total']:>10.1f}{f['newton_schulz']:>10.1f}"
           f"{f['elementwise']:>16.2f}   (momentum {f['momentum']:.2f}, update {f['update']:.2f}, "
           f"other {f['other']:.2f})",
           f"{'torch.optim.Muon':<22}{t['total']:>10.1f}{t['newton_schulz']:>10.1f}"
           f"{t['elementwise']:>16.2f}",
           f"speed-up over torch: {record['speedup']:.2f}x (NS in {record['dtype']} here, "
           "bfloat16 in torch)"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", default=DEFAULT_MATRICES,
                    help=f"COUNTxROWSxCOLS,... (default {DEFAULT_MATRICES})")
    ap.add_argument("--quick", action="store_true", help=f"small matrices ({QUICK_MATRICES})")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    shapes = parse_matrices(QUICK_MATRICES if args.quick else args.matrices)
    record = run(shapes, args.dtype, args.repeats, threads=args.threads)
    print("\n".join(lines(record)))
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
