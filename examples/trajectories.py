"""Optimizer trajectories on two ravines: an ill-conditioned quadratic and Rosenbrock's
curved valley, every step taken by fastopt.

Plain gradient descent must keep its step below 2 / (largest curvature) to stay stable,
so across the ravine it bounces from wall to wall while along the flat floor it barely
moves. Momentum averages the bouncing gradients away and builds speed along the floor;
RMSprop and Adam divide each coordinate's step by its recent gradient size, so the steep
and the flat direction advance at a similar pace. Writes ``trajectories.png``.

Run: ``python examples/trajectories.py [--steps 1.0] [--out DIR]`` (needs matplotlib).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import fastopt as fo

KAPPA = 40.0      # curvature ratio of the quadratic's two axes


def quadratic(p):
    x, y = p
    return 0.5 * (x * x + KAPPA * y * y), np.array([x, KAPPA * y])


def rosenbrock(p):
    x, y = p
    f = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    return f, np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


# problem -> (function, start, minimum, steps, extent, {method: (class, hyperparameters)});
# each method's hyperparameters are about the best of a small grid for that problem.
PROBLEMS = {
    "ill-conditioned quadratic  f = (x² + 40 y²) / 2": (
        quadratic, (-9.0, 1.6), (0.0, 0.0), 60, ((-10, 2), (-2.2, 2.2)), {
            "gradient descent": (fo.SGD, dict(lr=0.048)),
            "momentum 0.7": (fo.SGD, dict(lr=0.03, momentum=0.7)),
            "Nesterov 0.7": (fo.SGD, dict(lr=0.03, momentum=0.7, nesterov=True)),
            "RMSprop": (fo.RMSprop, dict(lr=0.3)),
            "Adam": (fo.Adam, dict(lr=0.8, betas=(0.8, 0.99))),
        }),
    "Rosenbrock's valley  f = (1 - x)² + 100 (y - x²)²": (
        rosenbrock, (-1.5, 2.2), (1.0, 1.0), 600, ((-2, 2), (-0.6, 3.1)), {
            "gradient descent": (fo.SGD, dict(lr=1.2e-3)),
            "momentum 0.9": (fo.SGD, dict(lr=5e-4, momentum=0.9)),
            "Nesterov 0.9": (fo.SGD, dict(lr=5e-4, momentum=0.9, nesterov=True)),
            "RMSprop": (fo.RMSprop, dict(lr=1e-2)),
            "Adam": (fo.Adam, dict(lr=0.03)),
        }),
}
STYLE = {"gradient descent": dict(color="black", lw=0.8), "momentum": dict(color="tab:blue"),
         "Nesterov": dict(color="tab:cyan", ls="--"), "RMSprop": dict(color="tab:orange"),
         "Adam": dict(color="tab:red")}


def trajectory(fn, start, steps, cls, hp):
    """Run ``steps`` fastopt steps from ``start``; returns the (steps + 1, 2) path."""
    p = np.array(start, dtype=np.float64)
    opt = cls([p], **hp)
    path = [p.copy()]
    for _ in range(steps):
        _, g = fn(p)
        opt.step([g])
        path.append(p.copy())
    return np.array(path)


def plot(results, path):
    """Draw both problems' trajectories over their contours; save to ``path``, return the Figure."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 5.6), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=(1.25, 1))
    for ax, (title, r) in zip(axes, results.items()):
        (x0, x1), (y0, y1) = r["extent"]
        gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        f = r["fn"](np.stack([gx, gy]))[0]
        ax.contour(gx, gy, f + 1e-3, levels=np.geomspace(f.min() + 1e-3, f.max(), 25),
                   norm=LogNorm(), cmap="Greys", linewidths=0.6)
        for name, tr in r["paths"].items():
            every = max(1, (len(tr) - 1) // 40)          # dots every `every` steps show the pace
            style = {"lw": 1.3, **STYLE[name.split(" 0.")[0]]}
            ax.plot(tr[:, 0], tr[:, 1], marker="o", ms=2.5, markevery=every, **style,
                    label=f"{name}: f = {r['final'][name]:.2g} after {len(tr) - 1} steps")
        ax.plot(*r["start"], "o", color="green", ms=7, label="start")
        ax.plot(*r["minimum"], "*", color="gold", mec="black", ms=14, label="minimum")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("x (first parameter)")
        ax.set_ylabel("y (second parameter)")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right" if "quadratic" in title else "upper right")
    fig.suptitle("Gradient descent zig-zags across the ravine; momentum and adaptive steps run along it"
                 " (dots every few steps show the pace; grey lines: contours of f)")
    fig.savefig(path, dpi=100)
    return fig


def run(out_dir=".", steps_scale=1.0) -> dict:
    """All trajectories (``steps_scale`` scales every step count); writes the PNG."""
    results = {}
    for title, (fn, start, minimum, steps, extent, methods) in PROBLEMS.items():
        n = max(1, int(steps * steps_scale))
        paths = {name: trajectory(fn, start, n, cls, hp) for name, (cls, hp) in methods.items()}
        results[title] = dict(
            fn=fn, start=start, minimum=minimum, extent=extent, paths=paths,
            initial=float(fn(np.array(start))[0]),
            final={name: float(fn(tr[-1])[0]) for name, tr in paths.items()},
            distance={name: float(np.linalg.norm(tr[-1] - np.array(minimum))) for name, tr in paths.items()})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "trajectories.png")
    plot(results, path)
    return {"png": path,
            **{title: {k: r[k] for k in ("initial", "final", "distance")} for title, r in results.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for trajectories.png")
    ap.add_argument("--steps", type=float, default=1.0, help="scale every problem's step count")
    args = ap.parse_args(argv)
    r = run(args.out, args.steps)
    for title in PROBLEMS:
        print(f"{title}: f = {r[title]['initial']:.3g} at the start")
        for name, f in r[title]["final"].items():
            print(f"  {name:>16}: f = {f:.3g}, distance to the minimum {r[title]['distance'][name]:.3g}")
    print(f"  wrote {r['png']}")
    return r


if __name__ == "__main__":
    main()
