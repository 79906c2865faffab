"""state_dict / load_state_dict in torch.optim's layout, all-or-nothing."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _validate, lowbit
from ._plan import KAHAN, MASTER

# Group keys that torch writes and fastopt has no use for; accepted and dropped on load.
TORCH_ONLY_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.copy()
    if hasattr(a, "get"):          # CuPy
        return a.get()
    return np.array(a)


def state_dict(opt) -> dict:
    state = {}
    for i, st in enumerate(opt._state):
        if not st:
            continue
        d = {name: _host(arr) for name, arr in st.items()} if opt.state_format.is_default \
            else lowbit.saved_arrays(opt, i, st)
        if opt.has_step_state:
            d["step"] = _step_array(int(opt._steps[i]))
        opt._host_save_to(i, d)
        state[i] = d
    groups, start = [], 0
    for g in opt.param_groups:
        n = len(g["params"])
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = list(range(start, start + n))
        start += n
        groups.append(d)
    # "iterations" (applied steps, the argument of callable lrs) is fastopt's own key;
    # torch's load_state_dict ignores it.
    out = {"state": state, "param_groups": groups, "iterations": int(opt.iterations)}
    if not opt.state_format.is_default:
        out["state_format"] = opt.state_format.record()
    return out


# Step counts are exact integers in float64 up to 2**53 (and fit the int64 step counters).
MAX_STEP = 2 ** 53


def _step_array(step: int) -> np.ndarray:
    """torch keeps ``step`` as a float32 scalar; past 2**24 float32 rounds it, so larger
    counts are written as float64 (a save/load round trip never changes a step count)."""
    dtype = np.float32 if step <= 2 ** 24 else np.float64
    return np.array(float(step), dtype=dtype)


def _as_step(value, label) -> int:
    v = np.asarray(value)
    if v.size != 1 or v.dtype.kind not in "fiu":
        raise ValueError(f"{label} must be a scalar step count, got {value!r}")
    f = float(v.reshape(()))
    if not math.isfinite(f) or f < 0 or f != int(f):
        raise ValueError(f"{label} must be a non-negative whole number, got {f}")
    if f > MAX_STEP:
        raise ValueError(f"{label} must be at most 2**53, got {f}")
    return int(f)


def _group_layout(opt, groups, state):
    """pytorch_optimizer's layout read as torch.optim's (new dicts; the inputs are unchanged).

    pytorch_optimizer keeps ``step`` in each param group and ``maximize`` on the optimizer
    (not in its groups). A group's ``step`` becomes the ``step`` of each of its params that
    has state; a param that also has its own ``step`` must agree with it. A group without
    ``maximize`` takes the optimizer's default. Anything else is left to the caller's checks.
    """
    if not isinstance(groups, (list, tuple)) or not isinstance(state, dict):
        return groups, state
    out_groups, out_state = [], dict(state)
    for gi, saved in enumerate(groups):
        if not isinstance(saved, dict):
            return groups, state
        group = dict(saved)
        if "maximize" in opt.defaults and "maximize" not in group:
            group["maximize"] = opt.defaults["maximize"]
        if "step" in group:
            where = f"state_dict['param_groups'][{gi}]['step']"
            step = _as_step(group.pop("step"), where)
            ids = group.get("params", ())
            for pid in ids if isinstance(ids, (list, tuple)) else ():
                try:
                    st = state.get(pid)
                except TypeError:          # an unhashable id: refused by the caller's checks
                    continue
                if not isinstance(st, dict) or not st:
                    continue
                if "step" not in st:
                    out_state[pid] = {**st, "step": step}
                elif _as_step(st["step"], f"state_dict['state'][{pid!r}]['step']") != step:
                    raise ValueError(
                        f"state_dict['state'][{pid!r}]['step'] is {_as_step(st['step'], '')} but "
                        f"{where} is {step}: a group-level step (pytorch_optimizer's layout) "
                        "and the per-param steps of its params must agree")
        out_groups.append(group)
    return out_groups, out_state


class Loading(NamedTuple):
    """What :func:`loaded_groups` checked: the groups to adopt, ``{param id: (group index,
    param index)}``, the per-param state (host values split off), the saved groups and
    host values (:meth:`_host_set_loaded`) and the optimizer's ``iterations`` (or None)."""

    groups: list
    ids: dict
    state: dict
    saved_groups: list
    host_values: dict
    iterations: int | None

    def param_of(self, pid, st) -> tuple:
        """``(group index, param index)`` of the saved state ``st`` of ``pid``, checked."""
        where = f"state_dict['state'][{pid!r}]"
        if not isinstance(st, dict):
            raise ValueError(f"{where} must be a dict of state arrays, got {type(st).__name__}")
        if pid not in self.ids:
            raise ValueError(f"{where} refers to no param in state_dict['param_groups']")
        return self.ids[pid]


def loaded_groups(opt, sd) -> Loading:
    """Step 1 of every load, checks only: the state dict's layout, its param groups against
    the optimizer's (sizes, hyperparameter names, values, param ids) and ``iterations``."""
    name = type(opt).__name__
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (torch layout)")
    groups, state = _group_layout(opt, sd["param_groups"], sd["state"])
    if not isinstance(state, dict):
        raise ValueError("state_dict['state'] must be a dict")
    state, host_values = opt._host_split_loaded(state)
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("state_dict['param_groups'] must be a list of dicts")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer has {len(opt.param_groups)}")
    new_groups, id_map = [], {}
    for gi, (saved, mine) in enumerate(zip(groups, opt.param_groups)):
        where = f"state_dict['param_groups'][{gi}]"
        ids = saved.get("params", ())
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{where}['params'] must be a list of param ids, got {type(ids).__name__}")
        ids = list(ids)
        if len(ids) != len(mine["params"]):
            raise ValueError(f"{where} has {len(ids)} params, the optimizer's group has {len(mine['params'])}")
        missing = set(opt.defaults) - set(saved)
        if missing:
            raise ValueError(f"{where} lacks {sorted(missing)}: it is not a {name} state dict")
        # Keys beyond the hyperparameters (a scheduler's initial_lr, max_lr, ...) are
        # carried along, as torch does; torch's implementation switches are dropped.
        group = {k: v for k, v in saved.items() if k != "params" and k not in TORCH_ONLY_KEYS}
        if "betas" in group:
            group["betas"] = tuple(float(b) for b in group["betas"])
        group["params"] = mine["params"]
        opt._check_group(group, where)
        new_groups.append(group)
        base = sum(len(g["params"]) for g in opt.param_groups[:gi])
        for k, pid in enumerate(ids):
            try:
                seen = pid in id_map
            except TypeError:
                raise ValueError(f"{where}['params'][{k}] is not a valid param id: {pid!r}") from None
            if seen:
                raise ValueError(f"{where}['params'] repeats param id {pid!r}: each id must name one param")
            id_map[pid] = (gi, base + k)
    iterations = sd.get("iterations")
    if iterations is not None:
        iterations = _as_step(iterations, "state_dict['iterations']")
    return Loading(new_groups, id_map, state, groups, host_values, iterations)


def adopt(opt, loading: Loading, loaded: dict) -> None:
    """The last step of a load, after every check: the groups' values, then fresh state
    filled from ``loaded`` ``{param index: (param, {key: array}, step, group)}``."""
    for gi, group in enumerate(loading.groups):
        opt.param_groups[gi].update({k: v for k, v in group.items() if k != "params"})
        opt._plans[gi] = None
    opt._state = [None] * len(opt._state)
    opt._arenas.clear()          # fresh state buffers: nothing left over from before the load
    opt._steps[:] = 0
    for i, (p, arrays, step, group) in loaded.items():
        opt._ensure_state(i, p, group, tuple(k for k in arrays if k in opt.slot_names))
        for key, value in arrays.items():
            dst = opt._state[i][key]
            src = np.asarray(value) if isinstance(dst, np.ndarray) else value
            dst[...] = _to_like(dst, src)
        opt._steps[i] = step
    if loading.iterations is not None:
        opt.iterations = loading.iterations
    if opt._host_values is not None:
        opt._host_set_loaded(loading.saved_groups, loading.host_values)


def load_state_dict(opt, sd) -> None:
    """Load torch.optim's layout (or pytorch_optimizer's: :func:`_group_layout`), all or nothing."""
    name = type(opt).__name__
    loading = loaded_groups(opt, sd)
    new_groups, id_map = loading.groups, loading.ids
    # 2. Per-param state: keys the loaded group needs, shapes, finite step counts; low-bit
    #    state converted to this optimizer's state_format (fastopt/lowbit.py).
    record = sd.get("state_format")
    loaded = {}
    for pid, st in loading.state.items():
        where = f"state_dict['state'][{pid!r}]"
        gi, i = loading.param_of(pid, st)
        p = opt.param_groups[gi]["params"][i - sum(len(g["params"]) for g in opt.param_groups[:gi])]
        need = {n for n in opt._active_slots(new_groups[gi]) if n is not None}
        have = set(st) - {"step"}
        if opt.has_step_state and "step" not in st:
            raise ValueError(f"{where} lacks 'step': it is not a {name} state dict")
        if need - have:
            raise ValueError(f"{where} lacks {sorted(need - have)}: it is not a {name} state dict "
                             f"for these hyperparameters")
        known = set(opt.slot_names) | {n + suffix for n in opt.slot_names
                                       for suffix in (lowbit.ABSMAX, lowbit.QMAP)}
        extra = have - known - ({MASTER, KAHAN} if np.dtype(p.dtype).itemsize == 2 else set())
        if extra:
            raise ValueError(f"{where} has unknown keys {sorted(extra, key=repr)}: it is not a {name} state dict")
        if MASTER in have and not opt.master_weights:
            raise ValueError(f"{where} holds {MASTER!r} (float32 master weights), but this "
                             f"{name} keeps none (master_weights=False)")
        if KAHAN in have and opt._pure != "kahan":
            raise ValueError(f"{where} holds {KAHAN!r} (a Kahan compensation), but this {name} "
                             "has none (kahan_sum=False)")
        compensation = {}
        if KAHAN in have:
            compensation = {KAHAN: _compensation(st[KAHAN], p, f"{where}[{KAHAN!r}]")}
            have = have - {KAHAN}
        if record is None and opt.state_format.is_default and have <= set(opt.slot_names) | {MASTER}:
            for key in have:
                _validate.state_array(st[key], p, f"{where}[{key!r}]", f"params[{i}]")
            arrays = {k: st[k] for k in have}
        else:
            arrays = lowbit.loaded_arrays(opt, p, st, have, record, where)
        arrays.update(compensation)
        step = _as_step(st["step"], f"{where}['step']") if "step" in st else (1 if have else 0)
        loaded[i] = (p, arrays, step, new_groups[gi])
    adopt(opt, loading, loaded)


def _compensation(src, p, label):
    """A saved Kahan compensation: the param's shape, any float or bfloat16 dtype."""
    shape = tuple(np.shape(src))
    if shape != tuple(p.shape):
        raise ValueError(f"{label} has shape {shape}, expected {tuple(p.shape)} like the param")
    dt = np.dtype(getattr(src, "dtype", np.float64))
    if dt.kind != "f" and dt != lowbit.bfloat16():
        raise TypeError(f"{label} has dtype {dt}, expected a floating dtype")
    return src


def _to_like(dst, src):
    if isinstance(dst, np.ndarray):
        return np.asarray(src, dtype=dst.dtype).reshape(dst.shape)
    import cupy
    return cupy.asarray(src, dtype=dst.dtype).reshape(dst.shape)
