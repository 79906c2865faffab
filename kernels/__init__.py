"""fastopt.kernels: per-optimizer element math, the drivers and the NumPy reference.

Each optimizer module holds one element function (plain Python over scalars, compiled by
the CPU driver with ``numba.njit`` and by the CUDA driver with ``cuda.jit(device=True)``),
its state slot names, and the host-side function that turns hyperparameters and the step
count into the element's scalars. ``cpu`` and ``cuda`` are the drivers; ``reference`` is
the independent NumPy oracle. Nothing here imports CUDA libraries.
"""
