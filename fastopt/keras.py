"""Keras 3's optimizers over fastopt's fused kernels: ``fastopt.keras.Adam(learning_rate=...)``.

As in Keras, an optimizer is created without variables and built on its first ``apply``
(or by ``build``)::

    opt = fastopt.keras.Adam(learning_rate=1e-3)   # no variables here (Keras's convention)
    opt.apply(grads, variables)                    # or opt.apply_gradients(zip(grads, variables))

``apply``, ``apply_gradients`` and the plain ``step(grads)`` (``step()`` for a FlatParams)
each run one fused step. Keras's names, defaults and equations (``keras.optimizers``,
Keras 3): ``learning_rate`` (a number, a ``fastopt.schedules`` Keras-style decay called
with the iteration count, or a callable of no arguments), ``beta_1``/``beta_2``,
``epsilon`` ("epsilon hat"), SGD's velocity with the learning rate inside, RMSprop's eps
inside the square root and lr inside its momentum, Adagrad's initial accumulator 0.1, and
the base optimizer's options (keras/src/optimizers/base_optimizer.py):

- ``weight_decay``: ``w -= w * weight_decay * lr`` before the update (AdamW: 0.004);
  ``exclude_from_weight_decay(var_list=None, var_names=None)`` before ``build`` exempts
  variables by identity, or by name: a variable is excluded when any of ``var_names``
  (regular expressions, so plain strings match as substrings: Keras joins them with
  ``|`` and searches) is found in its name. A variable's name is ``build(variables,
  names=[...])``'s entry, else its ``name`` attribute (Keras and TF variables have one);
  NumPy arrays have none, so name them in ``build``. Excluded variables step as a
  second param group of the same fused engine.
- ``clipnorm`` (each gradient to at most this 2-norm), ``clipvalue`` (each element to
  [-clipvalue, clipvalue]) or ``global_clipnorm`` (all gradients together); only one.
  ``clipvalue`` runs inside the element; ``global_clipnorm`` is one reduction pass and a
  gradient scale; ``clipnorm`` is one per-tensor reduction pass and per-tensor scales.
- ``loss_scale_factor``: gradients are divided by it before anything else (a scale the
  kernel applies as it reads them); ``scale_loss(loss)`` multiplies a loss by it.
- ``gradient_accumulation_steps=n`` (n >= 2): every call adds ``g / loss_scale_factor``
  to per-variable accumulators (one fused pass); every n-th call steps with ``(g +
  accumulated) / n`` (clipped, decayed, then the update) and zeroes them. ``iterations``
  counts real steps (calls // n) and drives bias corrections and EMA; learning-rate
  schedules see the call count, as in Keras.
- ``use_ema``: after every call, the averages ``a = m a + (1 - m) w`` (``m =
  ema_momentum``, 0 at iteration 0 so the first average is the variables), one fused
  pass (:class:`fastopt.EMA`); with ``ema_overwrite_frequency=k`` the variables take the
  averages whenever ``(iterations + 1) % k == 0``; ``finalize_variable_values()`` copies
  them at the end.
- one global ``iterations`` count (bias corrections use it for every variable, as Keras).

Sparse gradients (``fastopt.sparse.SparseGrad``, or any object with ``indices`` and
``values`` like ``tf.IndexedSlices``) are taken by every optimizer with Keras's result:
the dense step on the gradient scattered into zeros, duplicate rows summed (Keras's test
``test_sparse_correctness``). SGD and Adagrad (without weight decay on that variable)
update only the rows that change, as Keras's scatter updates do; the others, and any
variable weight decay applies to, run the dense fused step on the scattered gradient.
"""
from __future__ import annotations

from ._keras_base import _KerasOptimizer, keras_class
from .kernels.keras import SPECS

CLASSES: dict = {}
"""{class name: class}: one per spec of kernels/keras.py (Keras's signature: its
positional order, then the base options; AdamW subclasses Adam)."""

for _spec in SPECS:
    CLASSES[_spec.name] = globals()[_spec.name] = keras_class(
        _spec, CLASSES[_spec.parent] if _spec.parent else _KerasOptimizer, __name__)
del _spec

__all__ = list(CLASSES)
