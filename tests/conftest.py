import os

# Tests compare against torch on the CPU; keep its thread pool from fighting Numba's.
os.environ.setdefault("OMP_NUM_THREADS", "1")
