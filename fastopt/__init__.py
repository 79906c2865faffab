"""fastopt: fused, compiled optimizer steps for NumPy, CuPy and PyTorch arrays.

Every optimizer step is one pass over memory for any number of tensors: Numba
CPU-parallel kernels, numba-cuda GPU kernels, and an independent NumPy reference.
"""
from __future__ import annotations

from . import functional
from ._backend import BackendUnavailableError, backend
from .checkpoint import CheckpointError, load, save
from .flat import FlatParams
from .optim import SGD, Adagrad, Adam, AdamW, RMSprop
from .optimizer import Optimizer
from .sparse import SparseGrad

__version__ = "0.1.0"

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Optimizer", "FlatParams", "functional",
    "SparseGrad", "backend", "BackendUnavailableError", "save", "load", "CheckpointError", "__version__",
]
