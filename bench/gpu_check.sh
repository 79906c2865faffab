#!/usr/bin/env bash
# One command on a GPU machine: the CUDA tests for real, then the GPU figures.
#   OUT=/some/dir bash bench/gpu_check.sh        (from the repo root; no network needed)
# Writes $OUT/cuda_tests.log, $OUT/cuda_tests.xml, $OUT/gpu_figures.{json,txt}, $OUT/summary.txt.
# Each part runs on its own under a time limit; a failing part does not stop the other.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$SECONDS

# fastopt importable without installing: a site dir where fastopt/ mirrors the repo's
# fastopt/ and fastopt/kernels is kernels/ (setuptools maps it so; PYTHONPATH alone cannot).
# Everything runs from that dir so the repo's own fastopt/ (no kernels/) does not shadow it.
SITE=$(mktemp -d)
mkdir -p "$SITE/fastopt"
for f in "$REPO"/fastopt/*; do ln -s "$f" "$SITE/fastopt/"; done
ln -s "$REPO/kernels" "$SITE/fastopt/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Some numba-cuda releases call np.row_stack, which NumPy 2.5 removed (seen on the
# lent H100 image): alias it for this run only.
cat > "$SITE/sitecustomize.py" <<'PYEOF'
import numpy
if not hasattr(numpy, "row_stack"):
    numpy.row_stack = numpy.vstack
PYEOF
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$SITE/numba-cache}   # never write into the checkout
cd "$SITE"

# The CPU driver pins Numba's TBB threading layer; without the tbb wheel, use workqueue.
if ! "$PY" -c "import numpy as np, fastopt as fo; fo.SGD([np.ones(3, np.float32)], lr=0.1).step([np.ones(3, np.float32)])" >/dev/null 2>"$OUT/cpu_probe.err"; then
    echo "CPU step failed with the default threading layer (see cpu_probe.err); using NUMBA_THREADING_LAYER=workqueue"
    export NUMBA_THREADING_LAYER=workqueue
fi

{
    echo "== environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
    "$PY" - <<'PYEOF' 2>&1
import importlib
for m in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest"):
    try:
        print(f"  {m} {importlib.import_module(m).__version__}")
    except Exception as exc:
        print(f"  {m} unavailable: {type(exc).__name__}: {exc}")
from numba import cuda
print("  numba.cuda:", cuda.__file__, "available:", cuda.is_available())
PYEOF
} 2>&1 | tee "$OUT/environment.txt"

echo "== CUDA tests (tests/test_cuda_sim.py on the GPU, no simulator)"
unset NUMBA_ENABLE_CUDASIM
export FASTOPT_REQUIRE_GPU=1      # the test file errors out instead of skipping without a GPU
timeout 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider -p no:randomly \
    --rootdir "$REPO" -c "$REPO/pyproject.toml" --junitxml "$OUT/cuda_tests.xml" \
    "$REPO/tests/test_cuda_sim.py" 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== GPU figures"
timeout 240 "$PY" "$REPO/bench/gpu_figures.py" --out "$OUT" 2>&1 | tee "$OUT/gpu_figures.log"
figures_rc=${PIPESTATUS[0]}

{
    echo "== summary ($((SECONDS - start)) s)"
    echo "tests: rc=$tests_rc: $(grep -E '(passed|failed|error)' "$OUT/cuda_tests.log" | tail -1)"
    echo "figures: rc=$figures_rc"
    [ -f "$OUT/gpu_figures.txt" ] && cat "$OUT/gpu_figures.txt"
} | tee "$OUT/summary.txt"
rm -rf "$SITE"
[ "$tests_rc" -eq 0 ] && [ "$figures_rc" -eq 0 ]
