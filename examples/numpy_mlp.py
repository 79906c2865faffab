"""A NumPy-only MLP (no torch) trained with fastopt: SGD, momentum, Nesterov, Adagrad,
RMSprop and Adam on the same network, data and initial weights.

The task is three interleaved spirals in the plane (a classic that a linear model cannot
solve). Forward and backward passes are hand-written NumPy; the weights live in one
:class:`fastopt.FlatParams`, backward writes into its gradient views, and each optimizer
step is one fused pass over the whole model. Writes ``numpy_mlp.png``: the training-loss
curves and each optimizer's decision regions.

Run: ``python examples/numpy_mlp.py [--steps 1500] [--out DIR]`` (needs matplotlib).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np

import fastopt as fo

# name -> (fastopt class, hyperparameters); learning rates picked per method, as one would.
OPTIMIZERS = {
    "SGD": (fo.SGD, dict(lr=0.2)),
    "momentum": (fo.SGD, dict(lr=0.05, momentum=0.9)),
    "Nesterov": (fo.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "Adagrad": (fo.Adagrad, dict(lr=0.05)),
    "RMSprop": (fo.RMSprop, dict(lr=3e-3)),
    "Adam": (fo.Adam, dict(lr=5e-3)),
}


def spirals(n_per_class=200, classes=3, noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(c * 2 * np.pi / classes, c * 2 * np.pi / classes + 5.0, n_per_class)
        t = t + rng.normal(0, noise, n_per_class)
        xs.append(np.stack([r * np.cos(t), r * np.sin(t)], 1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


class MLP:
    """2 -> hidden -> hidden -> classes, tanh, softmax cross-entropy; weights in a FlatParams."""

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        arrays = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            arrays.append((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32))
            arrays.append(np.zeros(fan_out, np.float32))
        self.flat = fo.FlatParams(arrays)

    def forward(self, x):
        p = self.flat.params
        acts = [x]
        for k in range(0, len(p) - 2, 2):
            acts.append(np.tanh(acts[-1] @ p[k] + p[k + 1]))
        logits = acts[-1] @ p[-2] + p[-1]
        return logits, acts

    def loss_and_grads(self, x, y):
        """Mean cross-entropy; writes d loss / d weights into ``flat.grads`` in place."""
        p, g = self.flat.params, self.flat.grads
        logits, acts = self.forward(x)
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(1, keepdims=True)
        loss = -np.log(prob[np.arange(len(y)), y] + 1e-12).mean()
        d = prob
        d[np.arange(len(y)), y] -= 1
        d /= len(y)
        for k in range(len(p) - 2, -1, -2):
            a = acts[k // 2]
            np.matmul(a.T, d, out=g[k])
            np.sum(d, 0, out=g[k + 1])
            if k:
                d = (d @ p[k].T) * (1 - a * a)
        return float(loss)

    def predict(self, x):
        return self.forward(x)[0].argmax(1)


def train(name, x, y, steps, hidden, seed):
    cls, hp = OPTIMIZERS[name]
    model = MLP([2, hidden, hidden, 3], seed)
    opt = cls(model.flat, **hp)
    losses = np.empty(steps)
    step_s = np.empty(steps)
    for s in range(steps):
        losses[s] = model.loss_and_grads(x, y)
        t = time.perf_counter()
        opt.step()                          # reads flat.grads: one fused pass
        step_s[s] = time.perf_counter() - t
    accuracy = float((model.predict(x) == y).mean())
    return dict(model=model, losses=losses, accuracy=accuracy, step_us=1e6 * float(np.median(step_s)))


def plot(results, x, y, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 5, width_ratios=(2.4, 1, 1, 1, 0.05))
    ax = fig.add_subplot(grid[:, 0])
    for name, r in results.items():
        ax.plot(r["losses"], label=f"{name}: final {r['losses'][-1]:.3f}, accuracy {r['accuracy']:.0%}")
    ax.set_yscale("log")
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel("training cross-entropy")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    g = np.linspace(-1.15, 1.15, 160, dtype=np.float32)
    gx, gy = np.meshgrid(g, g)
    grid_pts = np.stack([gx.ravel(), gy.ravel()], 1)
    for k, (name, r) in enumerate(results.items()):
        a = fig.add_subplot(grid[k // 3, 1 + k % 3])
        regions = r["model"].predict(grid_pts).reshape(gx.shape)
        a.contourf(gx, gy, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=["#c6dbef", "#fdd0a2", "#c7e9c0"])
        a.scatter(x[:, 0], x[:, 1], c=np.array(["#2171b5", "#d94801", "#238b45"])[y], s=3)
        a.set_title(f"{name} ({r['accuracy']:.0%})", fontsize=10)
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("NumPy MLP on three spirals, stepped by fastopt (one fused pass per step)")
    fig.savefig(path, dpi=100)


def _one_blas_thread():
    """Tiny matmuls run fastest on one BLAS thread (and don't contend with Numba's)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def run(out_dir=".", steps=1500, hidden=64, seed=0, names=None) -> dict:
    x, y = spirals(seed=seed)
    with _one_blas_thread():
        results = {name: train(name, x, y, steps, hidden, seed) for name in (names or OPTIMIZERS)}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "numpy_mlp.png")
    plot(results, x, y, path)
    return {"png": path,
            "first_loss": {n: float(r["losses"][0]) for n, r in results.items()},
            "final_loss": {n: float(r["losses"][-1]) for n, r in results.items()},
            "accuracy": {n: r["accuracy"] for n, r in results.items()},
            "step_us": {n: r["step_us"] for n, r in results.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for numpy_mlp.png")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = run(args.out, args.steps, args.hidden, args.seed)
    for n in r["final_loss"]:
        print(f"{n:>9}: loss {r['first_loss'][n]:.3f} -> {r['final_loss'][n]:.4f}, "
              f"accuracy {r['accuracy'][n]:.1%}, step {r['step_us'][n]:.0f} us")
    print(f"  wrote {r['png']}")
    return r


if __name__ == "__main__":
    main()
