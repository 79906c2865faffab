"""The optimizer classes: one per spec of ``kernels/registry.py``, made by
:func:`fastopt.spec.optimizer_class` (``fastopt.Adam``, ``fastopt.AdamW``, ...).

A class is its spec attached to :class:`~fastopt.optimizer.Optimizer`, with the
constructor signature the spec declares (torch.optim's names, order and defaults); a
spec derived from another (AdamW from Adam) subclasses that one's class.
"""
from __future__ import annotations

import importlib

from .kernels.registry import SPECS
from .optimizer import Optimizer
from .spec import optimizer_class

CLASSES: dict = {}
"""{class name: class} in the registry's order."""


def _engine(spec) -> type:
    """The class ``spec``'s class subclasses: its parent's, its ``engine``, or Optimizer."""
    if spec.parent:
        return CLASSES[spec.parent]
    if spec.engine:
        module, _, name = spec.engine.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return Optimizer


for _spec in SPECS:
    CLASSES[_spec.name] = globals()[_spec.name] = optimizer_class(_spec, _engine(_spec), __name__)
del _spec

__all__ = list(CLASSES)
