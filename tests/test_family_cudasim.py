"""The new elements under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``; skipped otherwise).

Every element of the family and of fastopt.keras compiles as ``cuda.jit(device=True)``
inside a tiny kernel and gives the CPU-compiled element's results; the single-pass
optimizers also run end to end on the ``"cuda"`` backend against the NumPy reference.
(LAMB and LARS need per-tensor values in the CUDA driver: their elements are checked
here, their steps run on the CPU and NumPy backends.)

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_family_cudasim.py
"""
from __future__ import annotations

import os

import numba
import numpy as np
import pytest

from cases import RTOL, rel_err

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim,
              pytest.mark.skipif(not SIM, reason="NUMBA_ENABLE_CUDASIM=1 is not set")]
if SIM:
    # A module global: the simulator swaps numba.cuda for its own module in a kernel's
    # globals (a plain run never imports numba.cuda here).
    from numba import cuda


def _kernel(device):
    """A kernel applying device function ``device`` to each element, all outputs kept."""
    def kernel(p, g, s0, s1, s2, h, out):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if i < p.size:
            r = device(p[i], g[i], s0[i], s1[i], s2[i], h)
            for k in range(out.shape[0]):
                out[k, i] = r[k]
    return cuda.jit(kernel)


def _elements():
    """(id, element or reducer, scalars, n_outputs) for every new element."""
    from fastopt.kernels import adadelta, adamax, keras, lamb, lars, lion, nadam, radam
    f = np.float32
    out = [
        ("adamax", adamax.adamax_element, adamax.adamax_scalars(3, 0.01, 0.9, 0.999, 1e-8, 0.1, True, f), 4),
        ("nadam", nadam.nadam_element, nadam.nadam_scalars(3, 0.1, 0.01, 0.9, 0.999, 1e-8, 0.1, 4e-3, True, False, f), 4),
        ("radam", radam.radam_element, radam.radam_scalars(9, 0.01, 0.9, 0.999, 1e-8, 0.1, False, True, f), 4),
        ("adadelta", adadelta.adadelta_element, adadelta.adadelta_scalars(1.0, 0.9, 1e-6, 0.1, False, f), 4),
        ("lion", lion.lion_element, lion.lion_scalars(1e-3, 0.9, 0.99, 0.1, False, f), 4),
        ("lamb", lamb.lamb_element, lamb.lamb_scalars(3, 1e-3, 0.9, 0.999, 1e-6, 0.0, 0.01, f), 4),
        ("lamb_norms", lamb.lamb_norms, lamb.lamb_scalars(3, 1e-3, 0.9, 0.999, 1e-6, 0.0, 0.01, f), 2),
        ("lars", lars.lars_element, lars.lars_scalars(0.1, 0.9, 1e-4, True, f), 4),
        ("lars_norms", lars.lars_norms, lars.lars_scalars(0.1, 0.9, 1e-4, True, f), 2),
        ("keras_square", keras.grad_square, keras.SquareScalars(f(0)), 2),
    ]
    hp = dict(momentum=0.9, nesterov=True, rho=0.9, epsilon=1e-7, centered=True, amsgrad=True,
              beta_1=0.9, beta_2=0.999, clipvalue=0.5, weight_decay=0.01)
    for kind, element in keras.ELEMENTS.items():
        out.append((f"keras_{kind}", element, keras.keras_scalars(kind, hp, 3, 1e-3, f, 0.5), 4))
    return out


ELEMENTS = _elements()


@pytest.mark.parametrize("name,fn,h,n_out", ELEMENTS, ids=[e[0] for e in ELEMENTS])
def test_element_compiles_as_device_function(name, fn, h, n_out):
    kernel = _kernel(cuda.jit(device=True)(fn))

    rng = np.random.default_rng(0)
    n = 37
    args = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    # States as a run leaves them: second moments >= the square of first moments (centered
    # RMSprop takes sqrt(v - a^2 + eps)), so s0, s1 in [1, 2) and s2 in [0, 1).
    args += [rng.uniform(1, 2, n).astype(np.float32) for _ in range(2)]
    args += [rng.uniform(0, 1, n).astype(np.float32)]
    out = np.zeros((n_out, n), np.float32)
    kernel[2, 32](*args, h, out)
    cpu = numba.njit(fn)
    expected = np.array([cpu(*(a[i] for a in args), h) for i in range(n)], dtype=np.float32).T
    # The simulator runs the device function as Python over NumPy scalars (math.sqrt
    # rounds in float64 there): equal up to float32 rounding.
    for k in range(n_out):
        assert rel_err(out[k], expected[k]) <= 1e-6, f"output {k}"


def _run(make, shapes, steps, step_fn):
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = make(a, "cuda"), make(b, "numpy")
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        step_fn(oa, grads, a)
        step_fn(ob, grads, b)
    for x, y, i in zip(a, b, init):
        assert rel_err(x, y) <= RTOL[np.dtype(np.float32)]
    assert any(x.size and not np.array_equal(x, i) for x, i in zip(a, init))


SHAPES = [(0,), (1,), (5, 3), (37,)]
FAMILY = [
    ("Adamax", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5, weight_decay=0.1)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,kw", FAMILY, ids=[n for n, _ in FAMILY])
def test_family_on_the_cuda_backend(name, kw):
    from fastopt import family
    cls = getattr(family, name)
    _run(lambda ps, be: cls(ps, backend=be, **kw), SHAPES, 8, lambda o, g, ps: o.step(g))


KERAS = [
    ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True, clipvalue=0.5)),
    ("RMSprop", dict(momentum=0.5, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(learning_rate=0.05, global_clipnorm=2.0)),
    ("Adam", dict(amsgrad=True, learning_rate=0.01)),
    ("AdamW", dict(learning_rate=0.01)),
    ("Adamax", dict(learning_rate=0.01)),
    ("Nadam", dict(learning_rate=0.01)),
    ("Adadelta", dict(learning_rate=1.0)),
]


@pytest.mark.parametrize("name,kw", KERAS, ids=[n for n, _ in KERAS])
def test_keras_on_the_cuda_backend(name, kw):
    from fastopt import keras
    cls = getattr(keras, name)
    _run(lambda ps, be: cls(backend=be, **kw), SHAPES, 8, lambda o, g, ps: o.apply(g, ps))
