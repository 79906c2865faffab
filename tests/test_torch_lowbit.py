"""fastopt.torch with low-bit state: state dicts of torch tensors (uint8 codes, float32
absmax, bfloat16 moments) round-trip bit for bit, torch.optim's float32 state loads into
an int8 optimizer."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
ft = pytest.importorskip("fastopt.torch")


def _trained(fmt, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    opt = ft.AdamW([p], lr=1e-2, state_format=fmt)
    for _ in range(steps):
        p.grad = torch.randn(5000, generator=gen)
        opt.step()
    return p, opt


@pytest.mark.parametrize("fmt, dtype", [("int8", torch.uint8), ("bfloat16", torch.bfloat16)])
def test_state_dict_round_trip(fmt, dtype):
    p, opt = _trained(fmt)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == dtype
    assert sd["state_format"]["format"] == fmt
    q = torch.nn.Parameter(p.detach().clone())
    other = ft.AdamW([q], lr=1e-2, state_format=fmt)
    other.load_state_dict(sd)
    for key, value in sd["state"][0].items():
        assert torch.equal(other.state_dict()["state"][0][key], value), key
    g = torch.randn(5000)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    other.step()
    assert torch.equal(p, q)


def test_torch_float32_state_loads_into_int8():
    p = torch.nn.Parameter(torch.randn(5000))
    ref = torch.optim.AdamW([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.randn(5000)
        ref.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = ft.AdamW([q], lr=1e-2, state_format="int8")
    opt.load_state_dict(ref.state_dict())
    st = opt.state_dict()["state"][0]
    assert st["exp_avg"].dtype == torch.uint8
    from fastopt import lowbit
    from fastopt.kernels import blockwise
    m = lowbit.decode(st["exp_avg"].numpy(), st["exp_avg_absmax"].numpy(), 256,
                      blockwise.dynamic_map("signed"))
    expected = ref.state[p]["exp_avg"].numpy()
    assert np.max(np.abs(m - expected)) <= 0.01 * np.max(np.abs(expected))
