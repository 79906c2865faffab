import os

# Tests compare against torch on the CPU; keep its thread pool from fighting Numba's.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest tests run first. pytest-xdist hands tests out in collection order, so a
# minute-long test collected late (the CUDA simulator's child processes) would leave the
# other workers idle at the end of the run; started first, it overlaps the rest.
FIRST = ("test_cuda_simulator.py::", "test_distributed.py::")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(mark in item.nodeid for mark in FIRST))
