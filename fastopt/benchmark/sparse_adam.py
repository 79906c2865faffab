"""SparseAdam on a row-sparse embedding gradient, against torch.optim.SparseAdam and a roof
that touches the same rows.

The param is an embedding table of ``size / DIM`` rows of ``DIM`` (256) float32 (or
float64) values. Each step's gradient names a fixed fraction of the rows (``fraction``:
1 % and 10 % by default), distinct and sorted, drawn once, the same rows every step:
fastopt gets it as a :class:`fastopt.SparseGrad` (indices, rows), torch as the same
coalesced sparse COO tensor (``nn.Embedding(sparse=True)``'s gradient form).

Bytes a step moves, per touched row of ``DIM`` elements: read and write p, exp_avg and
exp_avg_sq (6 words per element), read the gradient row (1 word per element) and its
index (8 B): ``7 * itemsize * DIM + 8`` (7176 B in float32). GB/s count only those.

The roof is the driver that steps SparseAdam's rows (``kernels/cpu.py run_rows``) running
the roof element (``kernels/roof.py``: the same reads and writes, trivial math) over the
same rows, p and two state columns: the floor of the row step's memory traffic. fastopt's
time also includes its host work per step (checking and coalescing the SparseGrad).

fastopt, torch and the roof are timed interleaved (:func:`fastopt.benchmark.runner.
time_interleaved`), medians of ``repeats`` samples; ``threads`` sets both Numba's and
torch's thread count (restored after).

Hook for ``fastopt bench --optimizers sparse-adam``: :func:`run` returns a record (a
dict), :func:`lines` the table's lines.

Run:  python -m fastopt.benchmark.sparse_adam [--size 64M] [--fractions 0.01,0.1] [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

DIM = 256
FRACTIONS = (0.01, 0.10)
HYPER = dict(lr=1e-3)
INDEX_BYTES = 8


def bytes_per_row(dtype, dim=DIM) -> int:
    """Bytes one touched row moves (see the module doc)."""
    return 7 * np.dtype(dtype).itemsize * dim + INDEX_BYTES


def touched_rows(n_rows: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``round(fraction * n_rows)`` distinct row indices (at least one), sorted, int64."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n_rows)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=k, replace=False)).astype(np.int64)


def _roof_target(table, index, rows):
    """The roof element over ``index``'s rows of p and two state columns (run_rows)."""
    from fastopt.kernels import cpu, roof

    from .runner import Target
    p = table.copy()
    slots = (np.zeros_like(p), np.zeros_like(p), None)
    scalars = roof.roof_scalars(p.dtype.type)
    return Target(lambda: cpu.run_rows(roof.roof_element, p, index, rows, slots, scalars),
                  keep=(p, slots), numba_cpu=True)


def _torch_target(table, index, rows):
    """torch.optim.SparseAdam on the same rows as a coalesced sparse COO gradient, or
    None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None

    from .runner import Target
    param = torch.nn.Parameter(torch.from_numpy(table.copy()))
    with torch.sparse.check_sparse_tensor_invariants():
        grad = torch.sparse_coo_tensor(torch.from_numpy(index)[None, :], torch.from_numpy(rows),
                                       tuple(table.shape)).coalesce()
    param.grad = grad
    opt = torch.optim.SparseAdam([param], **HYPER)
    return Target(opt.step, keep=(param, grad, opt), settle_s=0.03)


def _fastopt_target(table, index, rows):
    import fastopt as fo

    from .runner import Target
    param = table.copy()
    opt = fo.SparseAdam([param], backend="cpu", **HYPER)
    grads = [fo.SparseGrad(index, rows)]
    return Target(lambda: opt.step(grads), keep=(param, opt), numba_cpu=True)


def run(size: int, fraction: float, dtype="float32", repeats=7, threads=None, seed=0) -> dict:
    """Time fastopt.SparseAdam, torch.optim.SparseAdam and the roof on a ``size``-element
    table (``size // DIM`` rows) whose gradient touches ``fraction`` of the rows. Without
    torch the record's torch figures are None."""
    from .runner import median_ms, thread_count
    n_rows = max(1, int(size) // DIM)
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_rows, DIM), dtype=np.float32).astype(dtype)
    index = touched_rows(n_rows, fraction, seed + 1)
    rows = (rng.standard_normal((index.size, DIM), dtype=np.float32) * 1e-2).astype(dtype)
    with thread_count(threads) as used:
        ms, every = median_ms({"fastopt": _fastopt_target(table, index, rows),
                               "torch": _torch_target(table, index, rows),
                               "roof": _roof_target(table, index, rows)}, repeats)
    moved = bytes_per_row(dtype) * index.size
    torch_ms = ms.get("torch")
    return {"optimizer": "sparse-adam", "dtype": str(np.dtype(dtype)), "rows": n_rows, "dim": DIM,
            "params": n_rows * DIM, "fraction": fraction, "touched_rows": int(index.size),
            "threads": used, "repeats": repeats,
            "bytes_per_step": moved, "bytes_per_touched_row": bytes_per_row(dtype),
            "fastopt_ms": ms["fastopt"], "torch_ms": torch_ms, "roof_ms": ms["roof"],
            "fastopt_gbs": moved / ms["fastopt"] / 1e6, "roof_gbs": moved / ms["roof"] / 1e6,
            "fraction_of_roof": ms["roof"] / ms["fastopt"],
            "speedup_vs_torch": None if torch_ms is None else torch_ms / ms["fastopt"],
            "all_ms": every}


def lines(records) -> list:
    from .report import _num, _table
    header = ["rows touched", "dtype", "MB/step", "fastopt ms", "GB/s", "roof ms", "of roof",
              "torch ms", "x torch"]
    rows = [[f"{r['fraction']:.0%} = {r['touched_rows']}", r["dtype"],
             _num(r["bytes_per_step"] / 1e6, ".1f"), _num(r["fastopt_ms"], ".2f"),
             _num(r["fastopt_gbs"], ".1f"), _num(r["roof_ms"], ".2f"), _num(r["fraction_of_roof"], ".2f"),
             _num(r["torch_ms"], ".1f"), _num(r["speedup_vs_torch"], ".1f")] for r in records]
    return _table(header, rows, "><>>>>>>>")


def title(size: int, dtype: str) -> str:
    rows = max(1, int(size) // DIM)
    return (f"SparseAdam vs torch.optim.SparseAdam: a {rows} x {DIM} {dtype} embedding table, "
            f"gradient rows a fixed fraction of its rows (sparse COO for torch); bytes: touched "
            f"rows' p, exp_avg, exp_avg_sq read+write, gradient rows and int64 indices "
            f"({bytes_per_row(dtype)} B/row); roof: the same rows through the same row driver")


def main(argv=None) -> int:
    from .cases import parse_size
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    print(title(size, args.dtype))
    records = [run(size, f, args.dtype, args.repeats, args.threads) for f in fractions]
    print("\n".join(lines(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
