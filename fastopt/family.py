"""The rest of the family by its old module name (the classes live in
:mod:`fastopt.optimizers`, made from their specs)."""
from .optimizers import LAMB, LARS, Adadelta, Adamax, Lion, NAdam, RAdam  # noqa: F401

__all__ = ["Adamax", "NAdam", "RAdam", "Adadelta", "Lion", "LAMB", "LARS"]
