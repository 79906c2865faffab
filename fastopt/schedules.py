"""Learning-rate schedules: torch.optim.lr_scheduler's classes and Keras-style decays.

The torch-style schedulers (``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR``,
``ReduceLROnPlateau``, ...) drive any optimizer with torch-like ``param_groups`` and
reproduce torch 2.13's lr (and momentum) sequences and ``state_dict()`` layout. The
Keras-style decays (``ExponentialDecay``, ``CosineDecay``, ...) are callables of the step
that an optimizer accepts as its ``lr``.
"""
from ._schedules_keras import (CosineDecay, CosineDecayRestarts, ExponentialDecay,
                               InverseTimeDecay, LearningRateSchedule, PiecewiseConstantDecay,
                               PolynomialDecay)
from ._schedules_cyclic import (ChainedScheduler, CosineAnnealingWarmRestarts, CyclicLR,
                                OneCycleLR, ReduceLROnPlateau, SequentialLR)
from ._schedules_torch import (ConstantLR, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR,
                               LRScheduler, MultiplicativeLR, MultiStepLR, PolynomialLR, StepLR)

__all__ = [
    # torch.optim.lr_scheduler
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
    "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "SequentialLR",
    "ChainedScheduler", "ReduceLROnPlateau",
    # keras.optimizers.schedules
    "LearningRateSchedule", "InverseTimeDecay", "ExponentialDecay", "PiecewiseConstantDecay",
    "PolynomialDecay", "CosineDecay", "CosineDecayRestarts",
]
