import os
import sys

import pytest

# Tests compare against torch on the CPU; keep its thread pool from fighting Numba's.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest tests run first. pytest-xdist hands tests out in collection order, so a
# minute-long test collected late (the CUDA simulator's child processes) would leave the
# other workers idle at the end of the run; started first, it overlaps the rest.
FIRST = ("test_cuda_simulator.py::", "test_distributed.py::")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(mark in item.nodeid for mark in FIRST))


def _atomic_simulated_shared_arrays():
    """Under Numba's CUDA simulator, make ``cuda.shared.array`` find-or-make atomic.

    The simulator runs a block's threads as Python threads, and its shared array (one per
    source line, made by the first thread to reach it) is looked up and then stored in
    two steps: two threads switching between them would get two arrays, and a block's
    tree reduction would lose partial sums. (One LARS parity failure under the simulator
    at a 0.1 ms thread switch interval fits this; 400 LAMB steps at 0.01 ms showed no
    failure with or without this fix, so the cause is not confirmed.) ``dict.setdefault``
    makes the lookup and the store one step under the GIL; the rest is the simulator's
    own rule (arrays named by their source line)."""
    import traceback

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    fixed = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype):
        if shape == 0:                       # dynamic shared memory: no per-line arrays
            return fixed(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        line = traceback.extract_stack(sys._getframe(), limit=2)[0][0:2]
        return self._allocations.setdefault(line, np.empty(shape, dtype))

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _atomic_simulated_shared_arrays()


@pytest.fixture(scope="module")
def quick_thread_switches():
    """A 0.5 ms Python thread switch interval for a module's simulator tests: the
    simulator's ``syncthreads`` hands the GIL between a block's threads, and at the
    default 5 ms a blockwise step spends most of its time waiting."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)
