"""Optimizer-step time on the CPU: fastopt.torch.Adam against torch.optim.Adam (fused and
foreach), on two parameter sets:

- ``transformer``: the parameters of a GPT-like model, 16 blocks of width 512 with a
  32k-token embedding: 260 tensors, 66.8M parameters (sizes from 512 to 16.4M).
- ``small``: 2000 tensors of 512 parameters (a model dominated by small tensors:
  norms, biases, adapters).

Gradients are set once and kept (``zero_grad`` is not part of the timing), so each
figure is the median wall time of ``optimizer.step()`` alone, after warm-up. Each
(model, optimizer) pair runs in a fresh process, so no thread pool left spinning by one
candidate (torch's OpenMP, Numba's TBB) slows the next. A second column times the same
step right after a large parallel torch op, as in a training loop where the step follows
backward.

Run: ``python examples/bench_torch_step.py [--model transformer|small] [--steps 20]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def transformer_shapes(layers=16, width=512, vocab=32000, mlp=4):
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]                                   # norm 1
        for _ in range(4):
            shapes += [(width, width), (width,)]                         # q, k, v, out
        shapes += [(width,), (width,)]                                   # norm 2
        shapes += [(mlp * width, width), (mlp * width,), (width, mlp * width), (width,)]
    return shapes + [(width,), (width,)]                                 # final norm


MODELS = {
    "transformer": transformer_shapes,
    "small": lambda: [(512,)] * 2000,
}


def make_params(shapes, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


CANDIDATES = ("torch.optim.Adam(fused=True)", "torch.optim.Adam(foreach=True)",
              "fastopt.torch.Adam", "fastopt.torch.Adam(flat=True)")


def make_optimizer(name, params, lr=1e-3):
    import torch

    import fastopt.torch as ft
    if name == "torch.optim.Adam(fused=True)":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "torch.optim.Adam(foreach=True)":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    if name == "fastopt.torch.Adam":
        return ft.Adam(params, lr=lr)
    if name == "fastopt.torch.Adam(flat=True)":
        return ft.Adam(params, lr=lr, flat=True)
    raise ValueError(f"unknown optimizer {name!r}")


def time_steps(name, model, steps, device="cpu", warmup=3):
    """Median ms of opt.step(): alone, and right after a parallel torch op."""
    import torch
    params = make_params(MODELS[model]())
    if device != "cpu":
        params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(name, params)
    a = torch.randn(1 << 24, device=device)
    b = torch.empty_like(a)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    out = {}
    for mode in ("alone", "after_torch_op"):
        for _ in range(warmup):
            opt.step()
        times = []
        for _ in range(steps):
            if mode == "after_torch_op":
                torch.mul(a, 1.0001, out=b)        # wakes torch's thread pool, as backward does
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - t)
        out[mode] = 1e3 * statistics.median(times)
    return out


def run(models=("transformer", "small"), steps=20, device="cpu", isolate=True) -> dict:
    """{model: {tensors, params, ms: {optimizer: {alone, after_torch_op}}}}."""
    out = {}
    for model in models:
        shapes = MODELS[model]()
        n = sum(int(__import__("math").prod(s)) for s in shapes)
        ms = {}
        for name in CANDIDATES:
            if isolate:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", model,
                       "--steps", str(steps), "--device", device]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode:
                    raise RuntimeError(f"{name} on {model} failed:\n{res.stderr[-3000:]}")
                ms[name] = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                ms[name] = time_steps(name, model, steps, device)
        out[model] = dict(tensors=len(shapes), params=n, ms=ms)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="default: both")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--in-process", action="store_true", help="don't isolate candidates in subprocesses")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(time_steps(args.worker, args.model[0], args.steps, args.device)))
        return {}
    import numba
    import torch
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.get_num_threads()} threads, {os.environ.get('NUMBA_THREADING_LAYER', 'default')} "
          f"layer), {os.cpu_count()} CPUs, device {args.device}")
    r = run(tuple(args.model or ("transformer", "small")), args.steps, args.device, not args.in_process)
    for model, v in r.items():
        fused = v["ms"]["torch.optim.Adam(fused=True)"]
        print(f"{model}: {v['tensors']} tensors, {v['params'] / 1e6:.1f}M params, Adam step, "
              f"median of {args.steps} (ms/step; ratio = torch fused time / this time)")
        print(f"  {'':<32} {'alone':>10} {'ratio':>6}   {'after a torch op':>16} {'ratio':>6}")
        for name, ms in v["ms"].items():
            print(f"  {name:<32} {ms['alone']:10.3f} {fused['alone'] / ms['alone']:6.2f}   "
                  f"{ms['after_torch_op']:16.3f} {fused['after_torch_op'] / ms['after_torch_op']:6.2f}")
    return r


if __name__ == "__main__":
    main()
