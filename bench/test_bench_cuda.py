"""CUDA rows (skipped without a GPU): fastopt's CUDA backend, torch on the GPU, the roofs."""
from __future__ import annotations

import pytest
from conftest import DTYPE, LAYOUT_NAMES, OPTIMIZERS, layout_data, run_benchmark

from fastopt.benchmark import gpu
from fastopt.benchmark.roof import copy_cuda_target, roof_bytes_per_param, roof_cuda_target
from fastopt.benchmark.runner import torch_target

GPU, WHY = gpu.gpu_available()
pytestmark = pytest.mark.skipif(not GPU, reason=f"no CUDA device: {WHY}")
CASES = [pytest.param(case, id=case.name) for case in OPTIMIZERS]


@pytest.fixture(autouse=True)
def _free_device_memory():
    yield
    gpu.free_memory()


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_cuda_roof(benchmark, layout, optimizer):
    run_benchmark(benchmark, roof_cuda_target(optimizer, layout_data(layout)), optimizer, layout,
                  "cuda-roof", bytes_per_param=roof_bytes_per_param(optimizer, DTYPE))


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_cuda_copy(benchmark, layout, optimizer):
    run_benchmark(benchmark, copy_cuda_target(optimizer, layout_data(layout)), optimizer, layout,
                  "cuda-d2d-copy", bytes_per_param=roof_bytes_per_param(optimizer, DTYPE))


@pytest.mark.parametrize("mode", ["flat", "list"])
@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_cuda_fastopt(benchmark, layout, optimizer, mode):
    target = gpu.fastopt_cuda_target(optimizer, layout_data(layout), mode)
    run_benchmark(benchmark, target, optimizer, layout, f"cuda-fastopt-{mode}")


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_cuda_torch(benchmark, layout, optimizer):
    if not gpu.torch_cuda_available():
        pytest.skip("torch has no CUDA device")
    if optimizer.torch_class() is None:
        pytest.skip(f"torch.optim has no counterpart of {optimizer.name}")
    target = torch_target(optimizer, layout_data(layout), device="cuda")
    run_benchmark(benchmark, target, optimizer, layout, f"cuda-torch-{target.mode}")
