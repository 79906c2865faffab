"""Sparse row gradients for embedding tables.

A :class:`SparseGrad` says "rows ``indices`` of this parameter have gradients ``rows``";
duplicate indices are summed first (torch's ``coalesce``, Keras's deduplication). SGD,
Adagrad and Adam accept it in place of a dense gradient and update only the rows that
need it, in parallel over unique rows:

- SGD without momentum and Adagrad: the rows present (the dense update is zero elsewhere,
  so this equals the dense step with a gradient that is zero outside those rows).
- SGD with momentum: every row whose momentum buffer is non-zero, i.e. every row seen
  so far (again equal to the dense step; torch's sparse SGD does the same).
- Adam: torch.optim.SparseAdam's lazy semantics: only rows present update their moments
  and weights, with SparseAdam's ``denom = sqrt(v) + eps``, ``lr * sqrt(bc2) / bc1``.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np

from . import _backend, _validate


class SparseGrad(NamedTuple):
    """Gradient rows of a (R, ...) parameter: ``rows[k]`` belongs to row ``indices[k]``."""

    indices: np.ndarray
    rows: np.ndarray

    def coalesce(self) -> "SparseGrad":
        """Unique sorted indices, duplicate rows summed (in index order: deterministic).
        Indices already strictly increasing (torch's coalesced COO gradients, most
        embedding lookups after ``unique``) are taken as they are: no sort, no copy."""
        i = self.indices
        if i.size < 2 or bool(np.all(i[1:] > i[:-1])):
            rows = self.rows
            return self if rows.flags.c_contiguous else SparseGrad(i, np.ascontiguousarray(rows))
        uniq, inverse = np.unique(self.indices, return_inverse=True)
        if uniq.size == self.indices.size:
            order = np.argsort(self.indices, kind="stable")
            return SparseGrad(uniq, np.ascontiguousarray(self.rows[order]))
        summed = np.zeros((uniq.size,) + self.rows.shape[1:], dtype=self.rows.dtype)
        np.add.at(summed, inverse.reshape(-1), self.rows)
        return SparseGrad(uniq, summed)


def rows_seen_so_far(seen: dict, i: int, param, sg: "SparseGrad"):
    """Momentum decays every row it has seen: the rows seen so far for param ``i``
    (``seen`` keeps a mask per param) and their gradient rows, zero where ``sg`` has none.
    Stepping these equals the dense step, as torch's sparse SGD and Keras's densified
    momentum do (rows never seen have zero velocity)."""
    mask = seen.get(i)
    if mask is None:
        mask = seen[i] = np.zeros(param.shape[0], dtype=bool)
    mask[sg.indices] = True
    index = np.flatnonzero(mask)
    rows = np.zeros((index.size,) + param.shape[1:], dtype=param.dtype)
    rows[np.searchsorted(index, sg.indices)] = sg.rows
    return index, rows


def check(grad, param, index: int) -> "SparseGrad":
    """Validate a SparseGrad against its parameter; return it coalesced, indices int64.
    The bounds are checked on the coalesced indices, which are sorted: their first and
    last are the least and the greatest (no pass over the indices for them)."""
    label = f"grads[{index}]"
    if not isinstance(param, np.ndarray):
        raise TypeError(f"{label}: sparse gradients are supported for NumPy params only")
    if param.ndim < 1:
        raise ValueError(f"{label}: a sparse gradient needs a param with rows (ndim >= 1)")
    idx = np.asarray(grad.indices)
    rows = np.asarray(grad.rows)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise TypeError(f"{label}.indices must be a 1-D integer array, got {idx.dtype} with shape {idx.shape}")
    if rows.shape != (idx.size,) + param.shape[1:]:
        raise ValueError(f"{label}.rows has shape {rows.shape}, expected {(idx.size,) + param.shape[1:]} "
                         f"(one row of params[{index}] per index)")
    if rows.dtype != param.dtype:
        raise TypeError(f"{label}.rows has dtype {rows.dtype}, expected {param.dtype}")
    # coalesced in the indices' own dtype: an unsigned index past int64 stays itself
    sg = SparseGrad(idx, rows).coalesce()
    if idx.size and (sg.indices[0] < 0 or sg.indices[-1] >= param.shape[0]):
        raise IndexError(f"{label}.indices must lie in [0, {param.shape[0]}), got "
                         f"[{sg.indices[0]}, {sg.indices[-1]}]")
    return sg if sg.indices.dtype == np.int64 else SparseGrad(sg.indices.astype(np.int64), sg.rows)


class SparseSteps:
    """The sparse-row half of :class:`~fastopt.optimizer.Optimizer`: SparseGrad entries
    are taken out of ``grads``, checked with the dense ones, and stepped row by row."""

    supports_sparse: ClassVar[bool] = False

    def _split_sparse(self, grads):
        """Take SparseGrad entries out of ``grads`` (they step separately)."""
        rule = getattr(self.spec, "sparse", None)
        sparse_only = rule is not None and not rule.dense
        if grads is None or _validate.is_array(grads):
            if sparse_only:
                self._refuse_dense(None if grads is None else 0)
            return grads, {}
        grads = list(grads)
        sparse = {i: g for i, g in enumerate(grads) if isinstance(g, SparseGrad)}
        for i in sparse:
            grads[i] = None
        if sparse_only:
            dense = next((i for i, g in enumerate(grads) if g is not None), None)
            if dense is not None:
                self._refuse_dense(dense)
        return grads, sparse

    def _refuse_dense(self, index):
        """A sparse-only optimizer (SparseAdam) refuses dense gradient ``index`` (None: the
        FlatParams' gradients), as torch does, before anything changes."""
        name = type(self).__name__
        what = "the FlatParams gradients are dense" if index is None else f"grads[{index}] is dense"
        raise TypeError(f"{name} does not support dense gradients ({what}), please consider Adam "
                        f"instead: {name} takes fastopt.SparseGrad(indices, rows) gradients")

    def _check_sparse(self, sparse, backend_name):
        if not sparse:
            return sparse
        name = type(self).__name__
        if not self.supports_sparse:
            raise TypeError(f"{name} does not take sparse gradients (SparseGrad): SGD, Adagrad and Adam do")
        _backend.require(backend_name, _backend.SPARSE_ROWS, f"{name} got a SparseGrad")
        located = {}
        for i, sg in sparse.items():
            gi, k = self._locate(i)
            group = self.param_groups[gi]
            self._check_sparse_group(group, f"param_groups[{gi}]")
            located[i] = (group, group["params"][k], check(sg, group["params"][k], i))
        return located

    def _locate_group(self, i):
        return self.param_groups[self._locate(i)[0]]

    def _locate(self, i):
        for gi, group in enumerate(self.param_groups):
            n = len(group["params"])
            if i < n:
                return gi, i
            i -= n
        raise IndexError(i)

    def _run_sparse(self, i, group, param, sg, backend_name, scale=1.0):
        slot_names = self._active_slots(group)
        self._ensure_state(i, param, group, slot_names)
        step = int(self._steps[i]) + 1
        slots = tuple(None if n is None else self._state[i][n] for n in slot_names)
        index, rows = self._sparse_rows(i, param, sg)
        _backend.get(backend_name).step_rows(self.spec, group, step, param, index, rows, slots, scale)
        self._steps[i] += 1
