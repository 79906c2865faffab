"""AdamW, Muon + AdamW and schedule-free AdamW training the same model.

The model and data are those of ``examples/lowbit_training.py``: a 64 -> 256 -> 256 -> 10
ReLU MLP on scikit-learn's 8x8 digits (1438 training, 359 test images), minibatches of
64 with fresh Gaussian pixel noise (0.5), the same initial weights and batches for every
optimizer. Three optimizers, with the hyperparameters their authors recommend as
starting points (no tuning here):

- ``fastopt.AdamW(lr=1e-3, weight_decay=1e-2)``, one fused pass over the FlatParams arena;
- ``fastopt.MuonWithAuxAdam``: Muon (KellerJordan's ``lr=0.02, momentum=0.95``, Nesterov,
  torch.optim.Muon's Newton-Schulz and its "original" lr adjustment, ``weight_decay=0.01``)
  on the two hidden-facing weight matrices, AdamW (``lr=1e-3``) on the output layer and
  the biases (KellerJordan/Muon's pairing);
- ``fastopt.AdamWScheduleFree(lr=2.5e-3, warmup_steps=100)``: no schedule; its training
  loss is measured at the params it steps (y), its test accuracy after ``eval()`` (x).

Printed: final training loss (mean of the last 100 steps), test accuracy, optimizer time
per step. Writes ``optimizers_compared.png`` (smoothed loss curves).

Run: ``python examples/optimizers_compared.py [--steps 2000] [--out PNG] [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import fastopt as fo
from fastopt.examples.lowbit_training import MLP, _one_blas_thread, smooth
from fastopt.examples.torch_digits import load_digits_split

TAIL = 100
NAMES = ("AdamW", "Muon + AdamW", "schedule-free AdamW")
DEFAULT_PNG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures",
                           "optimizers_compared.png")


def make_optimizer(name, model):
    p = model.flat.params
    if name == "AdamW":
        return fo.AdamW(model.flat, lr=1e-3, weight_decay=1e-2)
    if name == "Muon + AdamW":
        hidden = [p[0], p[2]]                         # the 64x256 and 256x256 weights
        rest = [p[1], p[3], p[4], p[5]]               # biases and the 256x10 output layer
        # (grads are then given in this order: train())
        return fo.MuonWithAuxAdam([
            dict(params=hidden, use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.01),
            dict(params=rest, use_muon=False, lr=1e-3, weight_decay=1e-2)])
    if name == "schedule-free AdamW":
        return fo.AdamWScheduleFree(model.flat, lr=2.5e-3, warmup_steps=100)
    raise ValueError(name)


def train(name, data, steps, sizes, batch, noise, seed):
    x_train, y_train, x_test, y_test = data
    model = MLP(sizes, seed)
    opt = make_optimizer(name, model)
    rng = np.random.default_rng(seed)
    losses = np.empty(steps)
    order, pos = rng.permutation(len(x_train)), 0
    t_opt = 0.0
    for s in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos:pos + batch]
        pos += batch
        xb = x_train[idx] + (rng.standard_normal((len(idx), x_train.shape[1])) * noise).astype(np.float32)
        losses[s] = model.loss_and_grads(xb, y_train[idx])
        t = time.perf_counter()
        if name == "Muon + AdamW":                    # grads in the groups' order
            opt.step([model.flat.grads[k] for k in (0, 2, 1, 3, 4, 5)])
        else:
            opt.step()                                # reads flat.grads: one fused pass
        t_opt += time.perf_counter() - t
    if hasattr(opt, "eval"):
        opt.eval()                                    # schedule-free: evaluate at x
    accuracy = float((model.predict(x_test) == y_test).mean())
    return dict(losses=losses, final=float(losses[-TAIL:].mean()), accuracy=accuracy,
                ms_per_step=1e3 * t_opt / steps)


def plot(results, path, settings):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    steps = settings["steps"]
    window = max(10, min(TAIL, steps // 20))
    for name, r in results.items():
        ax.plot(np.arange(1, steps + 1), smooth(r["losses"], window), lw=1.2,
                label=f"{name}: final {r['final']:.4f}, test {r['accuracy']:.1%}")
    ax.set_yscale("log")
    ax.set_xlabel(f"step (minibatch of {settings['batch']})")
    ax.set_ylabel(f"training cross-entropy (moving mean of {window} steps)")
    ax.set_title(f"AdamW, Muon + AdamW, schedule-free AdamW\nMLP {'-'.join(map(str, settings['sizes']))} "
                 f"on digits (+ pixel noise {settings['noise']:g}), same init and batches", fontsize=10)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def run(out=DEFAULT_PNG, steps=2000, batch=64, hidden=256, noise=0.5, seed=0) -> dict:
    data = load_digits_split(seed)
    sizes = (64, hidden, hidden, 10)
    with _one_blas_thread():
        results = {name: train(name, data, steps, sizes, batch, noise, seed) for name in NAMES}
    settings = dict(steps=steps, batch=batch, sizes=sizes, noise=noise, seed=seed)
    plot(results, out, settings)
    return {"png": out, "settings": settings, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=DEFAULT_PNG)
    ap.add_argument("--quick", action="store_true", help="300 steps, hidden 64 (for tests)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kw = dict(steps=300, hidden=64) if args.quick else dict(steps=args.steps)
    r = run(args.out, seed=args.seed, **kw)
    s = r["settings"]
    print(f"MLP {'-'.join(map(str, s['sizes']))} on digits, {s['steps']} steps of batch {s['batch']}, "
          f"pixel noise {s['noise']:g}, seed {s['seed']}")
    print(f"{'optimizer':>20}  {'final loss':>10}  {'test acc':>8}  {'opt ms/step':>11}")
    for name, res in r["results"].items():
        print(f"{name:>20}  {res['final']:10.4f}  {res['accuracy']:8.2%}  {res['ms_per_step']:11.3f}")
    print(f"  final loss: mean of the last {TAIL} steps; wrote {r['png']}")
    return 0 if all(np.isfinite(res["final"]) for res in r["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
