"""Per-param host scalars of a spec (``Spec.host``: NAdam's ``mu_product``).

One float32 value per param, advanced once per applied step, shown in ``opt.state`` and
saved in the state dict under the spec's name; the element's scalars read this step's
value as ``group[name]``. Mixed into :class:`~fastopt.optimizer.Optimizer`; inert for
specs without host state.
"""
from __future__ import annotations

import math

import numpy as np


class HostStates:
    """The host-state half of :class:`~fastopt.optimizer.Optimizer` (see the module doc)."""

    _host_values = None

    def _host_grow(self, n: int) -> None:
        host = self.spec.host if self.spec is not None else None
        if host is None:
            return
        fresh = np.full(n, host.initial, dtype=np.float32)
        old = self._host_values if self._host_values is not None else np.zeros(0, np.float32)
        self._host_values = np.concatenate([old, fresh])

    def _host_passes(self, group, bucket, step):
        """``[(group with this step's value, part of the bucket)]`` and the new values."""
        host = self.spec.host
        new = np.asarray(host.advance(self._host_values[bucket.indices], step, group), np.float32)
        values = np.unique(new)
        if values.size == 1:
            return [({**group, host.name: float(values[0])}, bucket)], new
        # Params whose values differ (loaded that way): one pass each.
        return [({**group, host.name: float(value)}, bucket.subset(np.flatnonzero(new == value)))
                for value in values], new

    def _host_add_to(self, i: int, d: dict) -> None:
        if self._host_values is not None:
            d[self.spec.host.name] = np.float32(self._host_values[i])

    def _host_split_loaded(self, state: dict):
        """The loaded state without host values, and the values ``{param id: float}``
        (checked: a scalar in the spec's range). Raises before anything changes."""
        host = self.spec.host if self.spec is not None else None
        if host is None or not isinstance(state, dict):
            return state, {}
        stripped, values = {}, {}
        for pid, st in state.items():
            if isinstance(st, dict) and host.name in st:
                st = dict(st)
                value = np.asarray(st.pop(host.name))
                where = f"state_dict['state'][{pid!r}][{host.name!r}]"
                if value.size != 1 or value.dtype.kind not in "fiu":
                    raise ValueError(f"{where} must be a scalar, got {value!r}")
                f = float(value.reshape(()))
                if not (math.isfinite(f) and host.low <= f <= host.high):
                    raise ValueError(f"{where} must be in [{host.low}, {host.high}], got {f}")
                values[pid] = f
            stripped[pid] = st
        return stripped, values

    def _host_set_loaded(self, saved_groups, values) -> None:
        """After a load: each param's saved value, or for state saved without one, the
        value after its steps at the loaded hyperparameters."""
        host = self.spec.host
        self._host_values = np.full(len(self._steps), host.initial, dtype=np.float32)
        base = 0
        for saved, group in zip(saved_groups, self.param_groups):
            for k, pid in enumerate(saved["params"]):
                i = base + k
                self._host_values[i] = values[pid] if pid in values else \
                    host.after(int(self._steps[i]), group)
            base += len(group["params"])
