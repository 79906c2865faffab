"""``fastopt demo``: run the three examples and write their PNGs.

With a cold Numba cache it took 23 s on an idle 2-core machine (most of it compiling the
optimizers' drivers), about three times that while other jobs loaded the machine;
``--quick`` takes seconds once they are compiled.

1. ``trajectories``: GD, momentum, Nesterov, RMSprop and Adam on an ill-conditioned
   quadratic and on Rosenbrock's valley (NumPy + fastopt).
2. ``numpy_mlp``: a NumPy-only MLP trained with SGD, momentum, Nesterov, Adagrad, RMSprop
   and Adam (NumPy + fastopt).
3. ``torch_digits``: a torch MLP on scikit-learn's digits with torch.optim.Adam and
   fastopt.torch.Adam(flat=True): the same loss curve, and each optimizer's step time
   (needs torch and scikit-learn; skipped with a note saying what to install when they
   are missing or fail to import).

An example that fails is reported with the file and line where it failed, the others
still run, and the last line says how many pictures were written.

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
import traceback
from pathlib import Path

EXAMPLES = ("trajectories", "numpy_mlp", "torch_digits")

# Keyword arguments of each example's run(): the default demo, and --quick (seconds).
SETTINGS = {
    "trajectories": ({}, {"steps_scale": 0.1}),
    "numpy_mlp": ({"steps": 600, "hidden": 32}, {"steps": 40, "hidden": 16}),
    # 8 epochs (184 steps per optimizer) show the curves coinciding; 20 took 2.5 minutes.
    "torch_digits": ({"epochs": 8}, {"epochs": 1, "hidden": 32, "layers": 2}),
}
# What each example needs beyond fastopt and NumPy, and the pip package of each module.
NEEDS = {"trajectories": ("matplotlib",), "numpy_mlp": ("matplotlib",),
         "torch_digits": ("matplotlib", "torch", "sklearn")}
PIP_NAMES = {"sklearn": "scikit-learn"}
INSTALL_ALL = "pip install 'fastopt[examples]'"


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
    """The modules example ``name`` needs that are absent or fail to import (an installed
    but broken torch is as missing as an absent one)."""
    missing = []
    for mod in NEEDS[name]:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
                continue
            importlib.import_module(mod)
        except Exception:
            missing.append(mod)
    return missing


def install_hint(modules) -> str:
    return (f"pip install {' '.join(PIP_NAMES.get(m, m) for m in modules)} "
            f"(or everything the examples use: {INSTALL_ALL})")


def _where(exc: BaseException) -> str:
    """The file and line an exception came from, relative to the source tree when inside it."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    root = str(examples_dir().parent) + os.sep
    path = frame.filename[len(root):] if frame.filename.startswith(root) else frame.filename
    return f"{path}:{frame.lineno}"


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
    names = args.only or EXAMPLES
    wrote, skipped, failed = [], [], []
    for name in names:
        missing = missing_dependencies(name)
        if missing:
            print(f"[{name}] skipped: needs {', '.join(missing)}, missing or not importable here; "
                  f"{install_hint(missing)}", flush=True)
            skipped.append(name)
            continue
        t = time.perf_counter()
        try:
            r = load_example(name).run(args.out, **SETTINGS[name][args.quick])
        except Exception as exc:  # report and go on with the other examples
            mod = (getattr(exc, "name", None) or "").split(".")[0]
            if (isinstance(exc, ModuleNotFoundError) and mod and mod != "fastopt"
                    and not mod.startswith("_fastopt_example")):
                # a package the example's dependencies need: still something to install
                print(f"[{name}] skipped: {exc}; {install_hint([mod])}", flush=True)
                skipped.append(name)
                continue
            print(f"[{name}] failed: {type(exc).__name__}: {exc} (at {_where(exc)}; "
                  f"python -m fastopt.examples.{name} shows the traceback)", flush=True)
            failed.append(name)
            status = 1
            continue
        wrote.append(r["png"])
        print(f"[{name}] {time.perf_counter() - t:.1f} s, wrote {r['png']}\n    {_summary(name, r)}",
              flush=True)
    tail = "".join(f"; {n} {what}" for what, group in (("skipped", skipped), ("failed", failed))
                   for n in group)
    print(f"fastopt demo: wrote {len(wrote)} of {len(names)} pictures to {args.out} in "
          f"{time.perf_counter() - start:.1f} s{tail}")
    return status


if __name__ == "__main__":
    sys.exit(main())
