"""State dicts between fastopt and pytorch_optimizer (pytorch-optimizer 4.1.0).

pytorch_optimizer's optimizers (``AdEMAMix``, ``Adan``, ...) use torch.optim's state-dict
layout with two differences: ``step`` is one count per param group (``group["step"]``, a
Python int), not one per param, and ``maximize`` is an attribute of the optimizer, not a
group key. Its ``Lookahead`` saves ``{"lookahead_state": {(group, index): {"slow_params":
..., "slow_momentum": ...}}, "base_optimizer": <the inner optimizer's state dict>}``.

Into fastopt: ``load_state_dict`` of every fastopt optimizer (and of fastopt.torch's
classes) takes pytorch_optimizer's layout as it is. A group's ``step`` is the step count of
each of its params; ``maximize`` missing from a group is the optimizer's default. A state
dict with torch tensors goes to fastopt.torch's classes directly; for fastopt's NumPy
classes :func:`from_pytorch_optimizer` first turns the tensors into NumPy arrays.

Out of fastopt: :func:`to_pytorch_optimizer` writes the layout that
``pytorch_optimizer.<Optimizer>.load_state_dict`` takes, so training continues there.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._state import _as_step

INNER_LAYOUTS = ("torch.optim", "pytorch_optimizer")


def to_pytorch_optimizer(state_dict: dict, *, inner: str = "torch.optim") -> dict:
    """A fastopt (or fastopt.torch) state dict in pytorch_optimizer's layout.

    Each param group gets ``step``, the common step count of its params (0 where none has
    state), and the params' state loses its ``step``. A Lookahead state dict (fastopt's or
    fastopt.torch's) gets ``(group, index)`` keys; its inner optimizer's state dict keeps
    torch.optim's layout (``inner="torch.optim"``: a pytorch_optimizer.Lookahead around a
    torch.optim optimizer) or is converted too (``inner="pytorch_optimizer"``: around one of
    pytorch_optimizer's). Arrays become torch tensors (copies) when torch is importable.
    The input is not changed.

    ``maximize`` stays in the groups for the record: pytorch_optimizer reads it from its
    optimizer's constructor argument, not from the state dict.

    Raises:
      ValueError: a group whose params have different step counts (pytorch_optimizer keeps
        one per group), low-bit state (``state_format``), or a dict of neither layout.
    """
    if inner not in INNER_LAYOUTS:
        raise ValueError(f"to_pytorch_optimizer: inner must be one of {INNER_LAYOUTS}, got {inner!r}")
    if _is_lookahead(state_dict):
        base = state_dict["base_optimizer"]
        _check_plain(base, "state_dict['base_optimizer']")
        look = _pair_keys(state_dict["lookahead_state"], base["param_groups"])
        base = _group_steps(base) if inner == "pytorch_optimizer" else _tensors(base)
        return {"lookahead_state": _tensors(look), "base_optimizer": base}
    _check_plain(state_dict, "state_dict")
    return _group_steps(state_dict)


def from_pytorch_optimizer(state_dict: dict) -> dict:
    """A copy of a pytorch_optimizer state dict with its tensors as NumPy arrays (CPU
    copies), which fastopt's NumPy classes load; its layout is left as it is (their
    ``load_state_dict`` reads it)."""
    if not isinstance(state_dict, dict):
        raise ValueError("from_pytorch_optimizer: state_dict must be a dict, got "
                         f"{type(state_dict).__name__}")
    return _arrays(state_dict)


# -- the pieces ----------------------------------------------------------------------------------
def _is_lookahead(sd) -> bool:
    return isinstance(sd, dict) and "lookahead_state" in sd and "base_optimizer" in sd


def _check_plain(sd, where) -> None:
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) \
            or not isinstance(sd.get("param_groups"), (list, tuple)) \
            or not all(isinstance(g, dict) for g in sd["param_groups"]):
        raise ValueError(f"{where} must be an optimizer state dict: a dict with 'state' (a dict) "
                         "and 'param_groups' (a list of dicts)")
    if "state_format" in sd:
        raise ValueError(f"{where} holds low-bit state (state_format="
                         f"{sd['state_format'].get('name', sd['state_format'])!r}), which "
                         "pytorch_optimizer has no layout for; load it into a fastopt optimizer "
                         "with the default state_format and save that")


def _group_steps(sd) -> dict:
    """torch.optim's per-param ``step`` -> one ``step`` per group (checked: one count)."""
    state, groups = {}, []
    for gi, group in enumerate(sd["param_groups"]):
        where = f"state_dict['param_groups'][{gi}]"
        steps = {}
        if "step" in group:
            steps[_as_step(group["step"], f"{where}['step']")] = "the group"
        for pid in group.get("params", ()):
            st = sd["state"].get(pid)
            if isinstance(st, dict) and "step" in st:
                steps.setdefault(_as_step(_host(st["step"]), f"state_dict['state'][{pid!r}]['step']"),
                                 f"param {pid!r}")
        if len(steps) > 1:
            counts = ", ".join(f"{who}: {n}" for n, who in sorted(steps.items()))
            raise ValueError(f"{where}: its params have different step counts ({counts}); "
                             "pytorch_optimizer keeps one step count per param group")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "step": next(iter(steps), 0), "params": list(group.get("params", ()))})
    for pid, st in sd["state"].items():
        state[pid] = {k: v for k, v in st.items() if k != "step"} if isinstance(st, dict) else st
    return _tensors({**{k: v for k, v in sd.items() if k not in ("state", "param_groups", "iterations")},
                     "state": state, "param_groups": groups})


def _pair_keys(look, groups) -> dict:
    """Lookahead's per-param keys (fastopt's position over all groups, or already a
    ``(group, index)`` pair) as pytorch_optimizer's ``(group, index)`` pairs."""
    if not isinstance(look, dict):
        raise ValueError("state_dict['lookahead_state'] must be a dict")
    pairs = {}
    for gi, g in enumerate(groups):
        for k, pid in enumerate(g.get("params", ())):
            pairs[pid] = (gi, k)
    known = set(pairs.values())
    out = {}
    for key, st in look.items():
        if isinstance(key, tuple) and tuple(key) in known:
            pair = tuple(key)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool) and key in pairs:
            pair = pairs[key]
        else:
            raise ValueError(f"state_dict['lookahead_state'][{key!r}]: the key names no param "
                             "of state_dict['base_optimizer']['param_groups']")
        out[pair] = st
    return out


def _host(a):
    """A NumPy copy of a NumPy, CuPy or torch array; anything else as it is."""
    if isinstance(a, np.ndarray):
        return a.copy()
    if hasattr(a, "detach") and hasattr(a, "cpu"):          # torch
        return a.detach().cpu().numpy().copy()
    if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):   # CuPy
        return a.get()
    return a


def _arrays(x):
    if isinstance(x, dict):
        return {k: _arrays(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_arrays(v) for v in x)
    return _host(x)


def _tensors(x):
    """NumPy (and CuPy) arrays in ``x`` as torch tensors when torch is importable, else
    NumPy arrays; torch tensors are left as they are."""
    try:
        import torch
    except ImportError:
        torch = None
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tensors(v) for v in x]
    if isinstance(x, np.ndarray) or hasattr(x, "__cuda_array_interface__") and not _is_tensor(x):
        a = _host(x)
        return torch.from_numpy(a) if torch is not None else a
    return x


def _is_tensor(x) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")
