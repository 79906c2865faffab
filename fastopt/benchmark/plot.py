"""The benchmark chart (``fastopt bench --plot PATH``): achieved GB/s against the roof.

One bar group per layout; in each group one bar per optimizer (and per low-bit state
format it ran with: "adam int8", against its own roof): the filled bar is fastopt
in FlatParams mode (one contiguous buffer per column; list mode when the run has no
FlatParams rows), the outline around it is the roof kernel with the same access pattern,
the number on top is the fraction of the roof (``~`` when it is within the noise), and a
marker shows torch. Every optimizer has its own colour (and, past 20, a hatch); the legend
sits to the right of the axes, clear of the bars. A GPU run adds a second panel with the
CUDA rows. Uses matplotlib's Agg canvas (no display); needs ``pip install 'fastopt[plot]'``.
"""
from __future__ import annotations

import os

from .cases import LAYOUT_TITLES, format_count

_PANELS = (("cpu", "fastopt", "roof", "torch"), ("cuda", "fastopt-cuda", "roof-cuda", "torch-cuda"))
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++", "--")
_MODE_TITLES = {"flat": "FlatParams (one contiguous buffer)", "list": "list mode (separate arrays)"}
INSTALL_HINT = "pip install 'fastopt[plot]' (or: pip install matplotlib)"


def check_plot_path(path) -> str:
    """Check before a run that ``path`` can take the chart: matplotlib importable and the
    extension one it writes (none means PNG). Returns the format; raises ValueError."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ValueError(f"--plot needs matplotlib, which is not importable here "
                         f"({type(exc).__name__}: {exc}); install it: {INSTALL_HINT}") from None
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in supported:
        raise ValueError(f"--plot {path}: matplotlib cannot write .{ext} files; use one of "
                         f"{', '.join('.' + e for e in sorted(supported))} (.png by default)")
    return ext or "png"


def optimizer_styles(n: int) -> list[tuple]:
    """``n`` distinct (colour, hatch) pairs: tab10's colours, then tab20's light shades of
    them (20 colours), then the same 20 colours hatched."""
    from matplotlib import colormaps
    dark = list(colormaps["tab10"].colors)
    light = list(colormaps["tab20"].colors)[1::2]
    palette = dark + light
    return [(palette[i % len(palette)], _HATCHES[(i // len(palette)) % len(_HATCHES)])
            for i in range(n)]


def _pick(rows, optimizer, layout, backend, mode=None, state="float32"):
    for r in rows:
        if (r.ok and r.optimizer == optimizer and r.layout == layout and r.backend == backend
                and (mode is None or r.mode == mode) and getattr(r, "state", "float32") == state):
            return r
    return None


def series(run) -> list[tuple[str, str, str]]:
    """The bars of each group: ``(label, optimizer, state)`` per optimizer and state
    format that ran, in the run's optimizer order, float32 first."""
    order = ("float32", "bfloat16", "int8")
    out = []
    for c in run.config.optimizers:
        states = {getattr(r, "state", "float32") for r in run.results if r.optimizer == c.name}
        for state in sorted(states, key=lambda s: order.index(s) if s in order else 9):
            out.append((c.name if state == "float32" else f"{c.name} {state}", c.name, state))
    return out or [(c.name, c.name, "float32") for c in run.config.optimizers]


def make_figure(run):
    """The chart of ``run`` (a :class:`~fastopt.benchmark.suite.BenchRun`) as a matplotlib
    Figure (not attached to pyplot)."""
    from matplotlib.figure import Figure

    cfg = run.config
    bars = series(run)
    names = [label for label, _, _ in bars]
    panels = [p for p in _PANELS if any(r.ok and r.device == p[0] for r in run.results)]
    if not panels:
        raise ValueError("nothing to plot: no row ran")
    mode = "flat" if "flat" in cfg.modes else (cfg.modes[0] if cfg.modes else "flat")
    styles = optimizer_styles(len(names))
    legend_cols = 1 if len(names) <= 18 else 2
    wide = min(22.0, max(9.0, 0.5 * len(names) * len(cfg.layouts) + 3 + 2.2 * legend_cols))
    fig = Figure(figsize=(wide, 5.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, (device, main, roof, torch) in zip(axes[:, 0], panels):
        top = 0.0
        for gi, layout in enumerate(cfg.layouts):
            for oi, (name, optimizer, state) in enumerate(bars):
                x = gi + (oi - (len(names) - 1) / 2) * width
                fast = (_pick(run.results, optimizer, layout, main, mode, state)
                        or _pick(run.results, optimizer, layout, main, None, state))
                ceiling = _pick(run.results, optimizer, layout, roof, None, state)
                if device == "cuda" and ceiling is None:
                    ceiling = _pick(run.results, optimizer, layout, "copy-cuda", None, state)
                ref = _pick(run.results, optimizer, layout, torch, None, state)
                if ceiling is not None:
                    ax.bar(x, ceiling.gb_per_s, width * 0.95, fill=False, edgecolor="black",
                           linewidth=1.0, label="roof kernel (same access pattern)" if gi == oi == 0 else None)
                    top = max(top, ceiling.gb_per_s)
                if fast is not None:
                    color, hatch = styles[oi]
                    ax.bar(x, fast.gb_per_s, width * 0.8, color=color, hatch=hatch or None,
                           edgecolor="white" if hatch else color, linewidth=0,
                           label=name if gi == 0 else None, gid=f"fastopt:{name}:{layout}")
                    top = max(top, fast.gb_per_s)
                    if ceiling is not None:
                        mark = "~" if "roof_fraction" in fast.uncertain else ""
                        ax.text(x, max(fast.gb_per_s, ceiling.gb_per_s),
                                f"{mark}{fast.gb_per_s / ceiling.gb_per_s:.2f}",
                                ha="center", va="bottom", fontsize=7)
                if ref is not None:
                    ax.plot([x], [ref.gb_per_s], marker="v", color="black", markersize=5, linestyle="",
                            label="torch (fused, else foreach)" if gi == oi == 0 else None)
                    top = max(top, ref.gb_per_s)
        ax.set_xticks(range(len(cfg.layouts)))
        ax.set_xticklabels([f"{LAYOUT_TITLES[lay]}\n{format_count(run.layout_info.get(lay, {}).get('n_params', 0))}"
                            f" params, {run.layout_info.get(lay, {}).get('n_tensors', '?')} tensor(s)"
                            for lay in cfg.layouts])
        ax.set_xlabel("parameter layout")
        ax.set_ylabel("effective GB/s (bytes per parameter x params / step time)")
        ax.set_ylim(0, top * 1.12 if top else 1)
        where = run.machine.get("gpu") if device == "cuda" else run.machine.get("cpu_model")
        ax.set_title(f"{device}: {where}", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i] not in names)  # optimizers first
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8,
                  ncol=legend_cols, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(axis="y", alpha=0.3)
    lowbit = any(state != "float32" for _, _, state in bars)
    fig.suptitle(f"fastopt {cfg.dtype} step throughput. Bars: fastopt over "
                 f"{_MODE_TITLES.get(mode, mode)}; outlines: the roof kernel"
                 + (" (a bfloat16 or int8 bar: that state format and its roof)" if lowbit else "")
                 + ";\nnumber: fraction of the roof (~ = within the noise); triangle: torch "
                 "(fused, else foreach)", fontsize=10)
    return fig


def write_plot(run, path) -> None:
    """Write the chart of ``run`` to ``path`` (PNG unless the extension says otherwise)."""
    fmt = check_plot_path(path)
    make_figure(run).savefig(path, dpi=120, format=fmt)
