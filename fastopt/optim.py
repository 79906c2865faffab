"""torch.optim's standard set by its old module name (the classes live in
:mod:`fastopt.optimizers`, made from their specs)."""
from .optimizers import SGD, Adagrad, Adam, AdamW, RMSprop  # noqa: F401

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]
