"""Per-param host scalars of a spec (``Spec.host``: NAdam's ``mu_product``, ASGD's ``eta``
and ``mu``).

One float32 value per param and host state (:class:`fastopt.spec.HostState`), advanced once
per applied step, shown in ``opt.state`` and saved in the state dict under the host
state's name; the element's scalars read the value as ``group[name]`` (this step's
advanced value, or with ``before`` the one the previous step left). Mixed into
:class:`~fastopt.optimizer.Optimizer`; inert for specs without host state.

The values live in one ``(params, host states)`` float32 array. NaN marks a value not set
yet: a param's value is taken from its group at its first step (``HostState.initial``
may name a hyperparameter: ASGD's ``eta`` starts at that step's lr, as torch's does).
"""
from __future__ import annotations

import math

import numpy as np


class HostStates:
    """The host-state half of :class:`~fastopt.optimizer.Optimizer` (see the module doc)."""

    _host_values = None         # (params, host states) float32; NaN: not set yet

    @property
    def _hosts(self) -> tuple:
        return self.spec.hosts if self.spec is not None else ()

    def _host_grow(self, n: int) -> None:
        hosts = self._hosts
        if not hosts:
            return
        fresh = np.full((n, len(hosts)), np.nan, dtype=np.float32)
        old = self._host_values if self._host_values is not None else \
            np.zeros((0, len(hosts)), np.float32)
        self._host_values = np.concatenate([old, fresh])

    def _host_passes(self, group, bucket, step):
        """``[(group with the values this step's element sees, part of the bucket)]`` and
        the values after this step (``(len(bucket), host states)``)."""
        hosts = self._hosts
        old = self._host_values[bucket.indices]
        unset = np.isnan(old)
        if unset.any():             # params at their first step: the group's initial values
            old = np.where(unset, np.array([h.initial_value(group) for h in hosts], np.float32), old)
        new = np.empty_like(old)
        seen = np.empty_like(old)
        for j, h in enumerate(hosts):
            new[:, j] = np.asarray(h.advance(old[:, j], step, group), np.float32)
            seen[:, j] = old[:, j] if h.before else new[:, j]
        names = [h.name for h in hosts]
        if seen.shape[0] == 0 or (seen == seen[0]).all():
            row = seen[0] if seen.shape[0] else np.array([h.initial_value(group) for h in hosts])
            return [({**group, **{n: float(x) for n, x in zip(names, row)}}, bucket)], new
        # Params whose values differ (loaded that way, or steps skipped): one pass each.
        rows, inverse = np.unique(seen, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        return [({**group, **{n: float(x) for n, x in zip(names, row)}},
                 bucket.subset(np.flatnonzero(inverse == r))) for r, row in enumerate(rows)], new

    def _host_value(self, i: int, j: int) -> np.float32:
        """Param ``i``'s value of host state ``j``; one not set yet is its initial value."""
        value = self._host_values[i, j]
        if np.isnan(value):
            return self._hosts[j].initial_value(self._locate_group(i))
        return np.float32(value)

    def _host_add_to(self, i: int, d: dict) -> None:
        """``opt.state[i]``'s host values (float32 scalars)."""
        if self._host_values is not None:
            for j, h in enumerate(self._hosts):
                d[h.name] = self._host_value(i, j)

    def _host_save_to(self, i: int, d: dict) -> None:
        """The state dict's host values of param ``i`` (0-d float32 arrays, as torch's
        float32 0-d tensors)."""
        if self._host_values is not None:
            for j, h in enumerate(self._hosts):
                d[h.name] = np.array(self._host_value(i, j), dtype=np.float32)

    def _host_views(self, i: int) -> dict:
        """``{name: 1-element float32 view}`` of param ``i``'s live host values (the
        ``fastopt.torch`` state's 0-d tensors view them)."""
        if self._host_values is None:
            return {}
        return {h.name: self._host_values[i, j:j + 1] for j, h in enumerate(self._hosts)}

    def _host_split_loaded(self, state: dict):
        """The loaded state without host values, and the values ``{param id: {name: float}}``
        (checked: a real scalar in the host state's range; one a non-empty state must carry
        is there). Raises before anything changes."""
        hosts = self._hosts
        if not hosts or not isinstance(state, dict):
            return state, {}
        stripped, values = {}, {}
        for pid, st in state.items():
            if isinstance(st, dict) and st:
                st = dict(st)
                for h in hosts:
                    where = f"state_dict['state'][{pid!r}][{h.name!r}]"
                    if h.name not in st:
                        if h.required:
                            raise ValueError(f"state_dict['state'][{pid!r}] lacks {h.name!r}: it is "
                                             f"not a {self.spec.name} state dict")
                        continue
                    values.setdefault(pid, {})[h.name] = _loaded_scalar(st.pop(h.name), h, where)
            stripped[pid] = st
        return stripped, values

    def _host_set_loaded(self, saved_groups, values) -> None:
        """After a load: each param's saved values; for state saved without one, the value
        after its steps at the loaded hyperparameters (not set yet for a param without
        steps: taken at its first step)."""
        hosts = self._hosts
        self._host_values = np.full((len(self._steps), len(hosts)), np.nan, dtype=np.float32)
        base = 0
        for saved, group in zip(saved_groups, self.param_groups):
            for k, pid in enumerate(saved["params"]):
                i = base + k
                steps = int(self._steps[i])
                mine = values.get(pid, {})
                for j, h in enumerate(hosts):
                    if h.name in mine:
                        self._host_values[i, j] = mine[h.name]
                    elif steps:
                        self._host_values[i, j] = h.after(steps, group)
            base += len(group["params"])


def _loaded_scalar(value, host, where) -> float:
    """A loaded host value: a real scalar (a float array, or a Python or NumPy number) in
    the host state's range."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where} must be a real scalar, got {value!r}")
    array = np.asarray(value)
    kind_ok = array.dtype.kind == "f" or (array.dtype.kind in "iu" and not isinstance(value, np.ndarray))
    if array.size != 1 or not kind_ok:
        raise ValueError(f"{where} must be a real scalar, got {value!r}")
    f = float(array.reshape(()))
    if not (math.isfinite(f) and host.accepts(f)):
        raise ValueError(f"{where} must be in {host.range_text}, got {f}")
    return f
