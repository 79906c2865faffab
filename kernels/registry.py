"""Every optimizer fastopt provides, by the kernel module that declares it.

Each module named here holds an element function and its spec (``fastopt/spec.py``):
``SPEC``, or ``SPECS`` where it declares several (Adam and AdamW). The optimizer classes,
functional forms, ``fastopt.torch`` classes, bench rows and test rows are made from
these specs, in this order; adding an optimizer is adding its line here.
"""
from __future__ import annotations

import importlib

MODULES = (
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "adamax",
    "nadam",
    "radam",
    "adadelta",
    "rprop",
    "asgd",
    "sparse_adam",
    "lion",
    "lamb",
    "lars",
    "adan",
    "ademamix",
    "schedulefree",
)


def _specs_of(name):
    module = importlib.import_module(f"{__package__}.{name}")
    return getattr(module, "SPECS", None) or (module.SPEC,)


SPECS = tuple(spec for name in MODULES for spec in _specs_of(name))
