"""CPU rows: the roof, fastopt (FlatParams and list), torch.optim and the NumPy reference."""
from __future__ import annotations

import pytest
from conftest import DTYPE, LAYOUT_NAMES, OPTIMIZERS, layout_data, run_benchmark

from fastopt.benchmark.roof import roof_bytes_per_param, roof_target
from fastopt.benchmark.runner import fastopt_target, numpy_target, torch_target

CASES = [pytest.param(case, id=case.name) for case in OPTIMIZERS]


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_roof(benchmark, layout, optimizer):
    run_benchmark(benchmark, roof_target(optimizer, layout_data(layout)), optimizer, layout, "roof",
                  bytes_per_param=roof_bytes_per_param(optimizer, DTYPE))


@pytest.mark.parametrize("mode", ["flat", "list"])
@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_fastopt(benchmark, layout, optimizer, mode):
    target = fastopt_target(optimizer, layout_data(layout), mode)
    run_benchmark(benchmark, target, optimizer, layout, f"fastopt-{mode}")


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_torch(benchmark, layout, optimizer):
    pytest.importorskip("torch")
    if optimizer.torch_class() is None:
        pytest.skip(f"torch.optim has no counterpart of {optimizer.name}")
    target = torch_target(optimizer, layout_data(layout))
    run_benchmark(benchmark, target, optimizer, layout, f"torch-{target.mode}")


@pytest.mark.parametrize("optimizer", CASES)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_numpy_reference(benchmark, layout, optimizer):
    target = numpy_target(optimizer, layout_data(layout))
    run_benchmark(benchmark, target, optimizer, layout, "numpy-ref", slow=True)
