"""``fastopt demo``: run the three examples and write their PNGs (under a minute by default).

1. ``trajectories``: GD, momentum, Nesterov, RMSprop and Adam on an ill-conditioned
   quadratic and on Rosenbrock's valley (NumPy + fastopt).
2. ``numpy_mlp``: a NumPy-only MLP trained with SGD, momentum, Nesterov, Adagrad, RMSprop
   and Adam (NumPy + fastopt).
3. ``torch_digits``: a torch MLP on scikit-learn's digits with torch.optim.Adam and
   fastopt.torch.Adam(flat=True): the same loss curve, and each optimizer's step time
   (needs torch and scikit-learn; skipped with a note when they are missing).

The examples are the scripts in the repository's ``examples/`` folder; installed as the
subpackage ``fastopt.examples`` they are imported from there.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

EXAMPLES = ("trajectories", "numpy_mlp", "torch_digits")

# Keyword arguments of each example's run(): the default demo, and --quick (seconds).
SETTINGS = {
    "trajectories": ({}, {"steps_scale": 0.1}),
    "numpy_mlp": ({"steps": 600, "hidden": 32}, {"steps": 40, "hidden": 16}),
    "torch_digits": ({"epochs": 20}, {"epochs": 1, "hidden": 32, "layers": 2}),
}
# What each example needs beyond fastopt and NumPy.
NEEDS = {"trajectories": ("matplotlib",), "numpy_mlp": ("matplotlib",),
         "torch_digits": ("matplotlib", "torch", "sklearn")}


def examples_dir() -> Path:
    """The source tree's ``examples/`` folder (next to the ``fastopt`` package)."""
    return Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The example module ``name``: ``fastopt.examples.<name>``, else the source tree's file."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {', '.join(EXAMPLES)}")
    try:
        return importlib.import_module(f"fastopt.examples.{name}")
    except ModuleNotFoundError:
        pass
    path = examples_dir() / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"fastopt demo: example {name!r} not found as fastopt.examples.{name} "
                                f"or at {path}; run it from a fastopt source checkout")
    module_name = f"_fastopt_example_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module


def missing_dependencies(name: str) -> list[str]:
    return [mod for mod in NEEDS[name] if importlib.util.find_spec(mod) is None]


def _summary(name: str, r: dict) -> str:
    if name == "trajectories":
        parts = []
        for title, v in r.items():
            if isinstance(v, dict) and "final" in v:
                best = min(v["final"], key=v["final"].get)
                parts.append(f"{title.split('  ')[0]}: GD f={v['final']['gradient descent']:.2g}, "
                             f"best {best} f={v['final'][best]:.2g}")
        return "; ".join(parts)
    if name == "numpy_mlp":
        return ", ".join(f"{n} loss {v:.3g}" for n, v in r["final_loss"].items())
    return (", ".join(f"{n} {v:.3f} ms/step" for n, v in r["step_ms"].items())
            + f"; loss curves differ by at most {r['max_loss_gap']:.2g}")


def main(argv=None) -> int:
    """Run the examples; returns the exit status (0 unless an example failed)."""
    ap = argparse.ArgumentParser(prog="fastopt demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fastopt-demo", help="folder for the PNGs (default: ./fastopt-demo)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a few seconds each")
    ap.add_argument("--only", action="append", choices=EXAMPLES, help="run only this example (repeatable)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    status, start = 0, time.perf_counter()
    for name in args.only or EXAMPLES:
        missing = missing_dependencies(name)
        if missing:
            print(f"[{name}] skipped: needs {', '.join(missing)} (pip install "
                  f"{' '.join('scikit-learn' if m == 'sklearn' else m for m in missing)})")
            continue
        t = time.perf_counter()
        try:
            r = load_example(name).run(args.out, **SETTINGS[name][args.quick])
        except Exception as exc:  # report and go on with the other examples
            print(f"[{name}] failed: {type(exc).__name__}: {exc}")
            status = 1
            continue
        print(f"[{name}] {time.perf_counter() - t:.1f} s, wrote {r['png']}\n    {_summary(name, r)}")
    print(f"fastopt demo: done in {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
