"""The benchmark chart (``fastopt bench --plot PATH``): achieved GB/s against the roof.

One bar group per layout; in each group one bar per optimizer: the filled bar is fastopt
(FlatParams mode), the outline around it is the roof kernel with the same access
pattern, the number on top is the fraction of the roof, and a marker shows torch. A GPU
run adds a second panel with the CUDA rows. Uses matplotlib's Agg backend (no display).
"""
from __future__ import annotations

from .cases import LAYOUT_TITLES, format_count

_PANELS = (("cpu", "fastopt", "roof", "torch"), ("cuda", "fastopt-cuda", "roof-cuda", "torch-cuda"))


def _pick(rows, optimizer, layout, backend, mode=None):
    for r in rows:
        if (r.ok and r.optimizer == optimizer and r.layout == layout and r.backend == backend
                and (mode is None or r.mode == mode)):
            return r
    return None


def write_plot(run, path) -> None:
    """Write the chart of ``run`` (a :class:`~fastopt.benchmark.suite.BenchRun`) as a PNG."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cfg = run.config
    names = [c.name for c in cfg.optimizers]
    panels = [p for p in _PANELS if any(r.ok and r.device == p[0] for r in run.results)]
    if not panels:
        raise ValueError("nothing to plot: no row ran")
    wide = min(18.0, max(8.0, 0.55 * len(names) * len(cfg.layouts) + 3))
    fig, axes = plt.subplots(len(panels), 1, figsize=(wide, 5.0 * len(panels)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / max(1, len(names))
    for ax, (device, main, roof, torch) in zip(axes[:, 0], panels):
        top = 0.0
        for gi, layout in enumerate(cfg.layouts):
            for oi, name in enumerate(names):
                x = gi + (oi - (len(names) - 1) / 2) * width
                fast = (_pick(run.results, name, layout, main, "flat")
                        or _pick(run.results, name, layout, main))
                ceiling = _pick(run.results, name, layout, roof)
                if device == "cuda" and ceiling is None:
                    ceiling = _pick(run.results, name, layout, "copy-cuda")
                ref = _pick(run.results, name, layout, torch)
                if ceiling is not None:
                    ax.bar(x, ceiling.gb_per_s, width * 0.95, fill=False, edgecolor="black",
                           linewidth=1.0, label="roof (same access pattern)" if gi == oi == 0 else None)
                    top = max(top, ceiling.gb_per_s)
                if fast is not None:
                    ax.bar(x, fast.gb_per_s, width * 0.8, color=colors[oi % len(colors)],
                           label=name if gi == 0 else None)
                    top = max(top, fast.gb_per_s)
                    if ceiling is not None:
                        ax.text(x, max(fast.gb_per_s, ceiling.gb_per_s), f"{ceiling.median_s / fast.median_s:.2f}",
                                ha="center", va="bottom", fontsize=7)
                if ref is not None:
                    ax.plot([x], [ref.gb_per_s], marker="v", color="black", markersize=5, linestyle="",
                            label="torch (fused, else foreach)" if gi == oi == 0 else None)
                    top = max(top, ref.gb_per_s)
        ax.set_xticks(range(len(cfg.layouts)))
        ax.set_xticklabels([f"{LAYOUT_TITLES[lay]}\n{format_count(run.layout_info.get(lay, {}).get('n_params', 0))}"
                            f" params, {run.layout_info.get(lay, {}).get('n_tensors', '?')} tensor(s)"
                            for lay in cfg.layouts])
        ax.set_ylabel("effective GB/s (bytes per parameter x params / step time)")
        ax.set_ylim(0, top * 1.15 if top else 1)
        where = run.machine.get("gpu") if device == "cuda" else run.machine.get("cpu_model")
        ax.set_title(f"fastopt {cfg.dtype} step throughput, {device}: {where}; "
                     "number = fraction of the roof", fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
