"""Where the int8 step's time goes: its compute per parameter against the memory roof.

``fastopt bench`` times whole steps at a size that streams from DRAM. This script splits
Adam's int8 step into what one core computes and what memory allows, to say whether a
machine is compute-bound for it and how many such cores would make it memory-bound:

1. The step's compute per parameter on one thread, in cache: the slope of the step time
   between 128K and 256K params (the fixed per-step cost cancels), for float32,
   bfloat16 and int8 state.
2. The int8 step's phases on one 256-element block in L1, one thread: decoding a column
   (code -> map value x absmax), the block's absmax (an integer max), encoding a column
   (the nearest-code table read as AVX2 gathers, :func:`fastopt.kernels.blockwise.encode_block`,
   and with the scalar code, :func:`~fastopt.kernels.blockwise.encode`).
3. The memory roofs at 64M params on every thread: the roof kernels with float32 and int8
   state's access pattern (:mod:`fastopt.kernels.roof`), in ns per param.

Then: int8 compute per param and thread / int8 roof per param = the threads at which the
int8 step would stop being compute-bound, if cores shared this bandwidth.

Run:  python bench/lowbit_floor.py [--size 64M]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import fastopt as fo
from fastopt import lowbit
from fastopt.kernels import blockwise, cpu, roof, threads


def median_s(fn, rounds=15, inner=10):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def compute_per_param(fmt: str) -> float:
    """ns per param of Adam's step with ``fmt`` state on one thread, in cache."""
    rng = np.random.default_rng(0)
    steps = {}
    for n in (1 << 17, 1 << 18):
        p = [rng.standard_normal(n).astype(np.float32)]
        g = [rng.standard_normal(n).astype(np.float32) * np.float32(1e-2)]
        opt = fo.Adam(p, lr=1e-3, state_format=fmt)
        opt.step(g)
        steps[n] = (opt, g)
    small, large = ((median_s(lambda o=o, g=g: o.step(g)), n) for n, (o, g) in steps.items())
    return (large[0] - small[0]) / (large[1] - small[1]) * 1e9


@numba.njit(cache=True)
def _decode(codes, qmap, out, reps):
    absmax = np.float32(0.5)
    for _ in range(reps):
        for i in range(codes.size):
            out[i] = qmap[codes[i]] * absmax


@numba.njit(cache=True)
def _absmax(values, reps):
    top = numba.uint32(0)
    for r in range(reps):
        for i in range(values.size):
            top = max(top, blockwise.magnitude_bits(values[i]))
        values[r % values.size] = np.float32(r)      # keeps the loop from being hoisted
    return top


@numba.njit(cache=True)
def _encode_gather(values, table, codes, reps):
    done = 0
    for _ in range(reps):
        done += blockwise.encode_block(values, np.float32(0.25), table, codes, values.size)
    return done


@numba.njit(cache=True)
def _encode_scalar(values, table, codes, reps):
    for _ in range(reps):
        for i in range(values.size):
            codes[i] = blockwise.encode(values[i] * np.float32(0.25), table)


def phases(reps=100_000) -> dict:
    """ns per element of each phase over one block in L1, one thread."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal(blockwise.BLOCK).astype(np.float32)
    codes = rng.integers(0, 256, blockwise.BLOCK).astype(np.uint8)
    qmap, table = blockwise.dynamic_map(), blockwise.encoder(blockwise.SIGNED)
    work = {"decode": lambda r: _decode(codes, qmap, values.copy(), r),
            "absmax": lambda r: _absmax(values.copy(), r),
            "encode, gathers": lambda r: _encode_gather(values, table, codes.copy(), r),
            "encode, scalar code": lambda r: _encode_scalar(values, table, codes.copy(), r)}
    return {name: median_s(lambda f=f: f(reps), rounds=7, inner=1) / reps / blockwise.BLOCK * 1e9
            for name, f in work.items()}


def roofs(n: int) -> dict:
    """ns per param of the float32 and int8 roofs (two state columns) on every thread."""
    rng = np.random.default_rng(2)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    scale = np.float32(1e-12)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    table = cpu.ChunkTable([p], [g], ([m], [v], None))
    h = roof.roof_scalars(np.float32)
    float_roof = median_s(lambda: cpu.run(roof.roof_element, table, h), rounds=7, inner=3)
    blocks = lowbit.n_blocks(n, blockwise.BLOCK)
    args = (p, g, np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.ones(blocks, np.float32),
            np.ones(blocks, np.float32), scale, blockwise.BLOCK, cpu.CHUNK)
    int8_roof = median_s(lambda: threads.launch(roof.lowbit_roof("int8", 2), *args), rounds=7, inner=3)
    return {"float32": float_roof / n * 1e9, "int8": int8_roof / n * 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M", help="params of the roof runs (default 64M)")
    args = ap.parse_args()
    from fastopt.benchmark.cases import parse_size
    n = parse_size(args.size)
    threads_all = numba.get_num_threads()
    numba.set_num_threads(1)
    print("Adam step compute, one thread, in cache (ns/param, slope 128K -> 256K params):")
    compute = {fmt: compute_per_param(fmt) for fmt in lowbit.STATE_FORMATS}
    for fmt, ns in compute.items():
        print(f"  {fmt:<9} {ns:6.2f}")
    print(f"int8 phases, one {blockwise.BLOCK}-element block in L1, one thread (ns/element):")
    for name, ns in phases().items():
        print(f"  {name:<21} {ns:6.3f}")
    numba.set_num_threads(threads_all)
    print(f"memory roofs, {args.size} params, {threads_all} threads (ns/param):")
    roof_ns = roofs(n)
    for fmt, ns in roof_ns.items():
        print(f"  {fmt:<9} {ns:6.3f}")
    for fmt in ("float32", "int8"):
        print(f"{fmt}: one thread computes a param in {compute[fmt]:.2f} ns, memory moves it in "
              f"{roof_ns[fmt]:.3f} ns: {compute[fmt] / roof_ns[fmt]:.1f} threads of this speed "
              f"keep up with memory")


if __name__ == "__main__":
    main()
