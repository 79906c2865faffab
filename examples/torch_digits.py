"""A torch MLP on scikit-learn's handwritten digits, trained from the same seed
with ``torch.optim.Adam``, ``torch.optim.Adam(fused=True)`` and ``fastopt.torch.Adam(flat=True)``.

The loss curves lie on top of each other (same math, float32 rounding apart), and the
optimizer step of each is timed. Writes ``torch_digits.png``: the loss curves, test
accuracy, and the median optimizer-step time of each.

Run: ``python examples/torch_digits.py [--epochs 20] [--out DIR]`` (needs torch,
scikit-learn and matplotlib).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np


def load_digits_split(seed=0, test_fraction=0.2):
    """The 1797 8x8 digits that ship with scikit-learn, scaled to [0, 1], split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_mlp(hidden=128, layers=3, seed=0):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    mods, width = [], 64
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


def train(make_optimizer, data, epochs, batch, hidden, layers, seed):
    """Train one MLP; returns per-step losses, per-step optimizer times, test accuracy."""
    import torch
    from torch import nn
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)
    model = make_mlp(hidden, layers, seed)
    opt = make_optimizer(model.parameters())
    order_rng = np.random.default_rng(seed)
    losses, step_s = [], []
    for _ in range(epochs):
        order = torch.from_numpy(order_rng.permutation(len(x_train)))
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            t = time.perf_counter()
            opt.step()
            step_s.append(time.perf_counter() - t)
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return np.array(losses), np.array(step_s), accuracy


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to ``n`` inside the block (None: left alone).

    The model is small (about 42k parameters in 8 tensors): a second thread only adds
    synchronisation to its forward and backward passes, and on a shared 2-core machine it
    made the whole training 2.4x slower. fastopt's step keeps Numba's threads.
    """
    if n is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plot(results, path, n_params, n_tensors, threads=None):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_loss, ax_time = fig.subplots(1, 2, width_ratios=(2, 1))
    styles = {"torch.optim.Adam": dict(color="tab:blue", lw=3, alpha=0.45),
              "torch.optim.Adam(fused=True)": dict(color="tab:green", lw=1, alpha=0.8),
              "fastopt.torch.Adam(flat=True)": dict(color="tab:red", lw=1.2, ls="--")}
    for name, r in results.items():
        ax_loss.plot(r["losses"], label=f"{name}  (test accuracy {r['accuracy']:.1%})", **styles[name])
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("cross-entropy (batch)")
    ax_loss.set_title("Same seed, same batches: the curves coincide")
    ax_loss.legend()
    names = list(results)
    ms = [1e3 * float(np.median(results[n]["step_s"])) for n in names]
    short = {"torch.optim.Adam": "torch.optim\nAdam", "torch.optim.Adam(fused=True)": "torch.optim\nAdam fused",
             "fastopt.torch.Adam(flat=True)": "fastopt.torch\nAdam flat"}
    labels = [short[n] for n in names]
    bars = ax_time.bar(labels, ms, color=[styles[n]["color"] for n in names])
    ax_time.bar_label(bars, [f"{v:.3f} ms" for v in ms])
    ax_time.set_ylabel("median optimizer.step() time [ms]")
    ax_time.set_title(f"{n_tensors} tensors, {n_params:,} params"
                      + (f", torch on {threads} thread{'s' if threads > 1 else ''}" if threads else ""))
    fig.suptitle("MLP on scikit-learn's digits: torch.optim.Adam (default, fused) and fastopt.torch.Adam(flat=True)")
    fig.savefig(path, dpi=110)


def run(out_dir=".", epochs=20, batch=64, hidden=128, layers=3, lr=1e-3, seed=0, threads=1) -> dict:
    """Train both ways, write the PNG; returns the figures shown in it. ``threads``: torch's
    threads while training (1: fastest for this small model; None: as they are)."""
    import torch

    import fastopt.torch as ft
    data = load_digits_split(seed)
    makers = {
        "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=lr),
        "torch.optim.Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=lr, fused=True),
        "fastopt.torch.Adam(flat=True)": lambda ps: ft.Adam(ps, lr=lr, flat=True),
    }
    results = {}
    with torch_threads(threads):
        for name, make in makers.items():
            losses, step_s, acc = train(make, data, epochs, batch, hidden, layers, seed)
            results[name] = dict(losses=losses, step_s=step_s, accuracy=acc)
    model = make_mlp(hidden, layers, seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "torch_digits.png")
    plot(results, path, n_params, n_tensors, threads)
    a, b = results["torch.optim.Adam"], results["fastopt.torch.Adam(flat=True)"]
    return {
        "png": path,
        "steps": len(a["losses"]),
        "first_loss": float(a["losses"][0]),
        "final_loss": {n: float(r["losses"][-20:].mean()) for n, r in results.items()},
        "max_loss_gap": float(np.max(np.abs(a["losses"] - b["losses"]))),
        "accuracy": {n: r["accuracy"] for n, r in results.items()},
        "step_ms": {n: 1e3 * float(np.median(r["step_s"])) for n, r in results.items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for torch_digits.png")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch's threads while training (0: leave them as they are)")
    args = ap.parse_args(argv)
    r = run(args.out, args.epochs, args.batch, args.hidden, args.layers, args.lr, args.seed,
            args.threads or None)
    print(f"digits MLP, {r['steps']} steps: loss {r['first_loss']:.3f} -> "
          + ", ".join(f"{n} {v:.4f}" for n, v in r["final_loss"].items())
          + f"; largest loss gap between the two runs {r['max_loss_gap']:.2g}")
    print("  test accuracy: " + ", ".join(f"{n} {v:.1%}" for n, v in r["accuracy"].items()))
    print("  median optimizer step: " + ", ".join(f"{n} {v:.3f} ms" for n, v in r["step_ms"].items()))
    print(f"  wrote {r['png']}")
    return r


if __name__ == "__main__":
    main()
