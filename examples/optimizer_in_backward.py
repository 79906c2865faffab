"""Optimizer-in-backward against stepping after backward, on a model of 50M+ parameters.

``fastopt.torch.AdamW(..., in_backward=True)`` steps each param from a post-accumulate-
grad hook as soon as backward has its gradient, and frees that gradient at once: the
gradients never all exist together. This script trains the same MLP (float32, CPU) both
ways, each in a fresh process, and prints per mode:

- peak memory of a training step above the model and its optimizer state: after one
  warm-up step (compilation, state allocated) and ``zero_grad()``, the peak RSS is reset
  (``/proc/self/clear_refs``) and the highest ``VmHWM`` over the next steps, less the RSS
  then, is what the steps add: the gradients alive at the peak and the activations (the
  same in both modes); params + state are counted from their sizes. The children run
  with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so a freed
  gradient goes back to the system and RSS follows live memory (glibc's default raises
  the threshold after the first free and then keeps freed gradients in its heap);
- the median time of backward + step (``backward()`` alone with ``in_backward=True``).

Run: ``python examples/optimizer_in_backward.py`` (``--width``, ``--layers``, ``--steps``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")            # resets VmHWM to the current RSS


def run_mode(mode: str, width: int, layers: int, steps: int, batch: int) -> dict:
    import torch

    import fastopt.torch as ft
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, width)
    opt = ft.AdamW(model.parameters(), lr=1e-4, in_backward=mode == "in_backward")

    def step():
        opt.zero_grad()
        loss = model(x).square().mean()
        t = time.perf_counter()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    step()                                  # warm-up: compile, allocate the state
    opt.zero_grad()
    gc.collect()
    base = _status_mb("VmRSS")
    _reset_peak()
    times = [step() for _ in range(steps)]
    peak = _status_mb("VmHWM")
    return {"mode": mode, "params": n, "peak_above_model_mb": peak - base,
            "step_ms": 1e3 * statistics.median(times),
            "grad_mb": n * 4 / 2**20, "state_mb": n * 8 / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per mode, alternated")
    ap.add_argument("--mode", choices=["after_backward", "in_backward"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.width, args.layers, args.steps, args.batch)))
        return
    rows = []
    for mode in ("after_backward", "in_backward") * args.rounds:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--width", str(args.width),
                              "--layers", str(args.layers), "--steps", str(args.steps),
                              "--batch", str(args.batch)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    n = rows[0]["params"]
    print(f"MLP {args.layers} x Linear({args.width}, {args.width}): {n / 1e6:.1f}M float32 params, "
          f"gradients {rows[0]['grad_mb']:.0f} MB, AdamW state {rows[0]['state_mb']:.0f} MB, batch {args.batch}")
    print(f"{'mode':<16}{'step peak over params+state (MB)':>34}{'backward + step (ms)':>24}")
    for r in rows:
        print(f"{r['mode']:<16}{r['peak_above_model_mb']:>34.0f}{r['step_ms']:>24.1f}")
    by = {m: [r for r in rows if r["mode"] == m] for m in ("after_backward", "in_backward")}
    mem = {m: statistics.median(r["peak_above_model_mb"] for r in v) for m, v in by.items()}
    ms = {m: statistics.median(r["step_ms"] for r in v) for m, v in by.items()}
    print(f"in_backward saves {mem['after_backward'] - mem['in_backward']:.0f} MB of peak memory "
          f"({mem['in_backward'] / mem['after_backward']:.2f}x) and takes "
          f"{ms['in_backward'] / ms['after_backward']:.2f}x the time of backward then step")
    return rows


if __name__ == "__main__":
    main()
