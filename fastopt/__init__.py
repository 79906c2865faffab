"""fastopt: fused, compiled optimizer steps for NumPy, CuPy and PyTorch arrays.

Every optimizer step is one pass over memory for any number of tensors: Numba
CPU-parallel kernels, numba-cuda GPU kernels, and an independent NumPy reference.
"""
from __future__ import annotations

from . import functional
from ._backend import BackendUnavailableError, backend
from .checkpoint import CheckpointError, load, save
from . import init
from .amp import GradScaler
from .clip import (NonFiniteNormError, all_finite, clip_grad_norm, clip_grad_value,
                   clip_grads_with_norm, global_norm)
from .ema import EMA
from .lr_finder import LRRangeResult, lr_range_test
from . import keras
from . import optimizers as _optimizers
from .optimizers import *  # noqa: F401,F403  (one class per spec of kernels/registry.py)
from .flat import FlatParams, FlatParamsCopyWarning
from .optimizer import Optimizer
from .sparse import SparseGrad
from .kernels.threads import ThreadingLayerError, ThreadingLayerWarning

__version__ = "0.1.0"

__all__ = [
    *_optimizers.__all__, "Optimizer", "FlatParams", "FlatParamsCopyWarning", "functional", "keras",
    "SparseGrad", "clip_grad_norm", "clip_grad_value", "clip_grads_with_norm", "global_norm",
    "all_finite", "NonFiniteNormError", "GradScaler", "EMA", "lr_range_test", "LRRangeResult",
    "init", "backend", "BackendUnavailableError", "save", "load", "CheckpointError",
    "ThreadingLayerWarning", "ThreadingLayerError", "__version__",
]

from .adafactor import Adafactor  # noqa: E402  (its own class: factored state, several passes)
__all__.append("Adafactor")

from .muon import Muon, MuonWithAuxAdam  # noqa: E402  (its own class: momentum pass, batched Newton-Schulz, update pass)
__all__ += ["Muon", "MuonWithAuxAdam"]

from .lookahead import Lookahead  # noqa: E402  (wraps any fastopt optimizer)
__all__.append("Lookahead")
