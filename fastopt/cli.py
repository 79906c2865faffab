"""The ``fastopt`` command line: ``bench`` (the main job), ``info``, ``warmup``, ``demo``.

    fastopt bench                      # quick default run (under a minute on 2 cores), prints a table
    fastopt bench --size 64M --optimizers adam,adamw,sgd-momentum,adagrad --json out.json --plot out.png
    fastopt bench --list               # the optimizer table with bytes per parameter
    fastopt info                       # versions, CPU, threading layer, backends, GPU
    fastopt warmup                     # compile the bench table's drivers into Numba's disk cache
    fastopt demo ...                   # fastopt.demo.main(args), when that module exists
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time


def _csv(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _threads(text: str) -> int:
    """1 .. Numba's thread ceiling (NUMBA_NUM_THREADS, the usable cores unless set)."""
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= top:
        raise argparse.ArgumentTypeError(f"must be between 1 and {top} (Numba's most on this "
                                         f"machine, NUMBA_NUM_THREADS), got {value}")
    return value


def check_output_path(flag: str, path: str) -> None:
    """Raise ValueError unless ``path`` can be written: not a folder, its folder exists
    and is writable, and an existing file there is writable."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path}: is a folder; give a file name inside it")
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise ValueError(f"{flag} {path}: the file exists and is not writable")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the uninformative None/False ones."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastopt", description="fastopt: fused, compiled optimizer "
                                "steps. Run 'fastopt bench' to see how fast on this machine.")
    sub = p.add_subparsers(dest="command", metavar="{bench,info,warmup,demo}")

    b = sub.add_parser("bench", help="throughput against the NumPy reference, torch and the roof",
                       description="Time every optimizer step on three layouts against the roof "
                       "kernel, the NumPy reference and torch; print a table. The default run "
                       "(4 optimizers, and Adam with bfloat16 and int8 state beside bitsandbytes' "
                       "8-bit Adam) takes about a minute on 2 cores, first-time compilation "
                       "included (41-58 s measured on idle 2-core machines before the low-bit rows, "
                       "which add about a sixth; two to three times that on a busy one); each "
                       "further optimizer adds about 6 s. Every flag and output path is checked "
                       "before anything is timed.",
                       formatter_class=_Defaults)
    from .benchmark.cases import OPTIMIZERS
    b.add_argument("--optimizers", default=None,
                   help="comma-separated optimizer names, or 'all'; when omitted, the table's "
                        f"default rows: {', '.join(c.name for c in OPTIMIZERS if c.default)} "
                        "(see --list)")
    b.add_argument("--list", action="store_true", help="print the optimizer table and exit")
    b.add_argument("--layouts", default="large,transformer,small",
                   help="comma-separated: large (one tensor), transformer (GPT-like mix), "
                        "small (2000 x 512)")
    b.add_argument("--size", default="8M",
                   help="parameters of the large and transformer layouts (8M, 64M, 500k, 1.5M: "
                        "decimal units)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--backends", default="roof,fastopt,numpy,torch,cuda,bnb",
                   help="comma-separated subset of roof,fastopt,numpy,torch,cuda,bnb "
                        "(unavailable ones are skipped with a note; bnb: bitsandbytes' CPU "
                        "8-bit Adam/AdamW beside fastopt's int8 rows)")
    b.add_argument("--state-formats", default=None, metavar="FORMATS",
                   help="comma-separated optimizer state formats to run for every optimizer: "
                        "float32 (the params' dtype), bfloat16, int8 (blockwise 8-bit); when "
                        "omitted, float32 for every optimizer and bfloat16 and int8 too for "
                        "adam (in float32 runs)")
    b.add_argument("--modes", default="flat,list", help="fastopt modes: flat (FlatParams), list")
    b.add_argument("--repeats", type=_int_at_least(1), default=15, help="timed samples per row")
    b.add_argument("--numpy-repeats", type=_int_at_least(1), default=3,
                   help="timed samples of the NumPy reference")
    b.add_argument("--max-time", type=_positive_float, default=1.0,
                   help="seconds of sampling per row before stopping early (at least 3 samples)")
    b.add_argument("--cold-start", default="adam",
                   help="optimizers to time in fresh processes with an empty and a warm Numba "
                        "cache: names, 'all' or 'none'")
    b.add_argument("--threads", type=_threads, default=None,
                   help="Numba and torch threads, 1 to Numba's most (when omitted: all cores)")
    b.add_argument("--no-memory", action="store_true", help="skip the per-step memory measurement")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="PATH", help="write the machine-readable record here")
    b.add_argument("--plot", metavar="PATH",
                   help="write a chart (GB/s of fastopt over FlatParams against the roof and "
                        "torch) here; PNG unless the extension says .svg or .pdf; needs "
                        "matplotlib (pip install 'fastopt[plot]')")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--no-clip", action="store_true",
                   help="skip the fused-clipping comparison (Adam with global-norm clipping "
                        "fused, against clip-then-step and torch); it runs only when adam is "
                        "among --optimizers (as by default), in float32")

    i = sub.add_parser("info", help="versions, CPU, threading layer, backends, GPU")
    i.add_argument("--json", action="store_true", help="print the information as JSON")

    w = sub.add_parser("warmup", help="compile the drivers of the bench table's optimizers "
                                      "(with its settings) into the on-disk cache",
                       description="Compile (or load) the CPU drivers of every optimizer in "
                       "the bench table, with the table's settings and variants (each set of "
                       "state slots and flags), into Numba's on-disk cache, so later processes "
                       "start stepping without compiling. All of them (62 drivers) take 1.5-2.5 "
                       "minutes on an idle 2-core machine, several times that on a busy one.")
    w.add_argument("--optimizers", default=None, help="comma-separated names (default: all)")
    w.add_argument("--dtypes", default="float32,float64", help="comma-separated storage dtypes")
    w.add_argument("--no-roof", action="store_true", help="skip the benchmark's roof kernels")
    w.add_argument("--quiet", action="store_true", help="print only the summary line")

    sub.add_parser("demo", help="run fastopt.demo (arguments are passed on)", add_help=False)
    return p


# Compile time per driver, measured with an empty cache on idle 2-core machines (all 62
# drivers in 91 s on one, 133 s on another; several times that while other jobs load it).
# `fastopt warmup` says up front what it compiles and about how long it takes.
WARMUP_SECONDS_PER_DRIVER = 2.0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = ["fastopt", *argv]
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"bench": _bench, "info": _info, "warmup": _warmup}[args.command](args)
    except ValueError as exc:
        print(f"fastopt {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- bench
def _bench(args) -> int:
    from .benchmark.cases import available_optimizers, case_info

    if args.list:
        rows = [case_info(c, args.dtype) for c in available_optimizers("all")]
        width = max(len(r["name"]) for r in rows)
        print(f"{'optimizer'.ljust(width)}  default  B/param ({args.dtype})  torch.optim  state slots / "
              "hyperparameters; B/param with bfloat16 / int8 state (one large tensor)")
        for r in rows:
            kw = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
            low = " / ".join("-" if r["bytes_per_format"][f] is None else f"{r['bytes_per_format'][f]:g}"
                             for f in ("bfloat16", "int8"))
            print(f"{r['name'].ljust(width)}  {'yes' if r['default'] else 'no ':7}  "
                  f"{r['bytes_per_param']:>17}  {str(r['torch'] or '-'):11}  "
                  f"{', '.join(r['slots']) or '-'}; {kw}; low-bit {low}")
        return 0
    from .benchmark import suite

    # Everything is checked before any work: a bad path or a missing matplotlib must not
    # cost the run (they used to surface after it, as a traceback).
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_path(flag, path)
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise ValueError(f"--json and --plot name the same file, {args.json}")
    if args.plot:
        from .benchmark.plot import check_plot_path
        check_plot_path(args.plot)
    # Optimizers that are not one fused pass have benches of their own (their passes,
    # their torch counterpart in the same run): run after the table.
    extras = []
    if args.optimizers:
        names = [n.lower() for n in _csv(args.optimizers)]
        extras = [n for n in EXTRA_BENCHES if n in names or "all" in names]
        rest = [n for n in _csv(args.optimizers) if n.lower() not in EXTRA_BENCHES]
        args.optimizers = ",".join(rest)
        if not rest:
            return _extra_benches(extras, args)
    optimizers = available_optimizers(args.optimizers) if args.optimizers else None
    cold = []
    if args.cold_start.strip().lower() not in ("none", ""):
        try:
            cold = available_optimizers(args.cold_start)
        except ValueError:
            if args.cold_start != "adam":     # the default may name an absent optimizer
                raise
    config = suite.BenchConfig(optimizers=optimizers, layouts=args.layouts, size=args.size,
                               dtype=args.dtype, backends=tuple(_csv(args.backends)),
                               modes=tuple(_csv(args.modes)), repeats=args.repeats,
                               numpy_repeats=args.numpy_repeats, max_time_s=args.max_time,
                               memory=not args.no_memory, cold_start=cold, threads=args.threads,
                               seed=args.seed, clip=not args.no_clip,
                               state_formats=args.state_formats)
    run = suite.run_bench(config, progress=not args.quiet, log=lambda line: print(line, flush=True))
    from .benchmark.report import format_run, write_json
    print(format_run(run))
    if args.json:
        write_json(run, args.json, args.argv)
        print(f"wrote {args.json}")
    if args.plot:
        from .benchmark.plot import write_plot
        write_plot(run, args.plot)
        print(f"wrote {args.plot}")
    status = 1 if any(r.error for r in run.results) and not any(r.ok for r in run.results) else 0
    if extras:
        status = max(status, _extra_benches(extras, args))
    return status


# Benches of their own: Adafactor (its factored passes against torch.optim.Adafactor and a
# roof with their traffic), Muon (Newton-Schulz and elementwise time against
# torch.optim.Muon on the same matrices), SparseAdam (row-sparse gradients against
# torch.optim.SparseAdam) and Lookahead (around AdamW, against pytorch_optimizer's). At
# --size 64M (or more) Adafactor's and Muon's full layouts, below it their quick ones.
EXTRA_BENCHES = ("adafactor", "muon", "sparse-adam", "lookahead")


def _extra_benches(names, args) -> int:
    from .benchmark.cases import parse_size
    big = parse_size(args.size) >= 64_000_000
    for name in names:
        if name == "adafactor":
            from .benchmark import adafactor
            layouts = ("matrices", "gpt") if big else ("quick",)
            print(f"\nAdafactor vs torch.optim.Adafactor ({args.dtype}; roof: its passes' 24 B/param "
                  "in float32 with trivial math)", flush=True)
            records = [adafactor.run(layout, args.dtype, repeats=max(3, min(args.repeats, 7)),
                                     threads=args.threads, seed=args.seed) for layout in layouts]
            print("\n".join(adafactor.lines(records)), flush=True)
        elif name == "sparse-adam":
            from .benchmark import sparse_adam
            size = parse_size(args.size)
            print("\n" + sparse_adam.title(size, args.dtype), flush=True)
            records = [sparse_adam.run(size, f, args.dtype, repeats=max(3, min(args.repeats, 7)),
                                       threads=args.threads, seed=args.seed)
                       for f in sparse_adam.FRACTIONS]
            print("\n".join(sparse_adam.lines(records)), flush=True)
        elif name == "lookahead":
            from .benchmark import lookahead
            from .benchmark.cases import parse_layouts
            print("\n" + lookahead.title(args.dtype), flush=True)
            records = [lookahead.run(layout, parse_size(args.size), args.dtype,
                                     repeats=max(3, min(args.repeats, 7)), threads=args.threads,
                                     seed=args.seed)
                       for layout in parse_layouts(args.layouts)]
            print("\n".join(lookahead.lines(records)), flush=True)
        else:
            from .benchmark import muon
            matrices, note = muon.matrices_for(big)
            if note:
                print(note, flush=True)
            print(f"\nMuon vs torch.optim.Muon on {matrices} ({args.dtype})", flush=True)
            record = muon.run(muon.parse_matrices(matrices), args.dtype,
                              repeats=max(3, min(args.repeats, 7)), threads=args.threads,
                              seed=args.seed)
            print("\n".join(muon.lines(record)), flush=True)
    return 0


# ------------------------------------------------------------------------------ info
def _info(args) -> int:
    from .benchmark.cases import available_optimizers
    from .benchmark.machine import backend_status, machine_info, start_threading_layer

    start_threading_layer()
    info = machine_info(import_torch=False)
    info["backends"] = backend_status()
    info["optimizers"] = {c.name: c.bytes_per_param() for c in available_optimizers("all")}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    v = info["versions"]
    lines = [
        f"fastopt {v['fastopt']}  (python {info['python']}, {info['platform']})",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "fastopt" and val),
        f"cpu: {info['cpu_model']}; {info['usable_cores']} usable cores "
        f"({info['logical_cores']} logical, {info['physical_cores']} physical); "
        f"{info['memory_gb']} GiB memory",
        f"cpu features: {info['cpu']['llvm_cpu']}: {' '.join(info['cpu']['features']) or '-'}",
        f"numba: {info['numba_threads']} threads, threading layer {info['threading_layer']}, "
        f"cache dir {info['numba_cache_dir'] or 'next to the kernels (__pycache__)'}",
        "backends:",
        *(f"  {name:6} {status}" for name, status in info["backends"].items()),
        f"gpu: {info['gpu'] or 'none (' + str(info['gpu_status']) + ')'}",
        "optimizers (bytes/param, float32): "
        + ", ".join(f"{n} {b}" for n, b in info["optimizers"].items()),
    ]
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- warmup
def _warmup(args) -> int:
    import numba
    from tqdm import tqdm

    from .benchmark.coldstart import warmup, warmup_cases, warmup_plan

    dtypes = tuple(_csv(args.dtypes))
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise ValueError(f"dtypes must be float32 or float64, got {d!r}")
    plan = warmup_plan(args.optimizers, dtypes, roof=not args.no_roof)
    n_settings = len(warmup_cases(args.optimizers))
    n_roofs = sum(case is None for case, _, _ in plan)
    where = numba.config.CACHE_DIR or "next to fastopt's kernels (__pycache__)"
    def count(n, what):
        return f"{n} {what}{'' if n == 1 else 's'}"
    roofs = " + " + count(n_roofs, "roof kernel") if n_roofs else ""
    estimate = len(plan) * WARMUP_SECONDS_PER_DRIVER
    print(f"fastopt warmup: {count(len(plan), 'CPU driver')} ({count(n_settings, 'optimizer setting')}"
          f" x {count(len(dtypes), 'dtype')}{roofs})"
          f" into Numba's on-disk cache, {where}. Compiling takes about "
          f"{WARMUP_SECONDS_PER_DRIVER:g} s per driver on 2 cores ({_duration(estimate)} for "
          "these when idle, several times that on a busy machine); drivers already in the cache "
          "load in a fraction of a second.", flush=True)
    bar = tqdm(total=len(plan), desc="fastopt warmup", unit="driver", file=sys.stderr,
               disable=args.quiet, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()

    started = []

    def progress(desc):                    # called before each driver: count the one before
        if started:
            bar.update()
        started.append(desc)
        bar.set_postfix_str(desc)

    try:
        rows = warmup(plan=plan, progress=progress)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    total = time.perf_counter() - t0
    if not args.quiet:
        for r in rows:
            extra = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            print(f"{r['optimizer']:16} {r['dtype']:8} slots [{', '.join(r['slots'])}]"
                  f"{' (' + extra + ')' if extra else ''}: {r['how']} in {r['seconds']:.2f} s")
    compiled = sum(r["how"] == "compiled" for r in rows)
    print(f"fastopt warmup: {len(rows)} drivers ready ({compiled} compiled, "
          f"{sum(r['how'] == 'cache' for r in rows)} loaded from the cache) in {total:.1f} s")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    return f"about {seconds / 60:.1f} minutes"


# ------------------------------------------------------------------------------ demo
def _demo(argv) -> int:
    try:
        demo = importlib.import_module("fastopt.demo")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastopt.demo",):
            raise                            # the demo exists but needs something missing
        print("fastopt demo: this installation of fastopt has no demo (module fastopt.demo "
              "not found)", file=sys.stderr)
        return 2
    result = demo.main(argv)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
