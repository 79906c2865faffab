"""fastopt.torch on FSDP2 (``fully_shard``: DTensor params), gloo, 2 processes on loopback.

Params are DTensors sharded over a 1-D mesh; fastopt steps each rank's local shards in one
fused pass, and its state is DTensors with the params' placements, so
``torch.distributed.checkpoint`` saves and reshards it. Shown here:

- ``fastopt.torch.AdamW`` against ``torch.optim.AdamW`` in the same run, FSDP2 with
  ``reshard_after_forward`` on and off, global-norm clipping fused (``max_grad_norm=``,
  reduced across the mesh) against ``torch.nn.utils.clip_grad_norm_``;
- DCP save after 6 steps, load into world size 2 and into world size 1, resume for 4
  steps: equal to the uninterrupted run (bit for bit on 2 ranks; to float32 rounding on
  1, whose gradients are reduced in another order);
- ``flat=True`` over DTensors refused (FSDP2 owns the shards' storage), other tensor
  subclasses refused naming the class.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from cases import run_gloo_workers

torch = pytest.importorskip("torch", reason="torch not installed: fastopt.torch is not tested")
pytest.importorskip("torch.distributed.fsdp", reason="torch without distributed support")
nn = torch.nn

STEPS, SAVE_AT, BATCH, LR, CLIP = 10, 6, 8, 1e-2, 0.5
TIMEOUT_S = 120


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 1))


def batch(step, rank, world):
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(BATCH, 8, generator=g)
    y = x.sum(1, keepdim=True).cos()
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _sharded(mesh, reshard=True):
    from torch.distributed.fsdp import fully_shard
    m = make_model()
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
    return m


def _train(m, opt, steps, rank, world, clip_torch=False):
    for s in steps:
        opt.zero_grad()
        nn.functional.mse_loss(m(batch(s, rank, world)[0]), batch(s, rank, world)[1]).backward()
        if clip_torch:
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        opt.step()


def _full(m):
    return [p.full_tensor().detach().numpy().copy() for p in m.parameters()]


def _worker(rank: int, world: int, out_dir: str, phase: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    import fastopt.torch as ft

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    ckpt = os.path.join(out_dir, "ckpt")

    def resume(tag):
        m = _sharded(mesh)
        opt = ft.AdamW(m.parameters(), lr=LR, weight_decay=0.1, max_grad_norm=CLIP)
        sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(m, sd["model"])
        set_optimizer_state_dict(m, opt, sd["optim"])
        _train(m, opt, range(SAVE_AT, STEPS), rank, world)
        for i, p in enumerate(_full(m)):
            out[f"{tag}/param/{i}"] = p

    if phase == "train":
        for reshard in (True, False):
            tag = "reshard" if reshard else "keep"
            m_t, m_f = _sharded(mesh, reshard), _sharded(mesh, reshard)
            o_t = torch.optim.AdamW(m_t.parameters(), lr=LR, weight_decay=0.1)
            o_f = ft.AdamW(m_f.parameters(), lr=LR, weight_decay=0.1, max_grad_norm=CLIP)
            p0 = next(m_f.parameters())
            assert type(p0).__name__ in ("DTensor", "Parameter") and hasattr(p0, "placements")
            _train(m_t, o_t, range(SAVE_AT), rank, world, clip_torch=True)
            _train(m_f, o_f, range(SAVE_AT), rank, world)
            if reshard:
                st = o_f.state[p0]["exp_avg"]
                out["state_placements"] = np.array(str(st.placements) == str(p0.placements))
                out["state_local_shape"] = np.array(tuple(st.to_local().shape) == tuple(p0.to_local().shape))
                sd = {"model": get_model_state_dict(m_f), "optim": get_optimizer_state_dict(m_f, o_f)}
                dcp.save(sd, checkpoint_id=ckpt)
            _train(m_t, o_t, range(SAVE_AT, STEPS), rank, world, clip_torch=True)
            _train(m_f, o_f, range(SAVE_AT, STEPS), rank, world)
            out[f"{tag}/last_norm"] = np.array(o_f._fo.last_grad_norm)
            for i, (a, b) in enumerate(zip(_full(m_t), _full(m_f))):
                out[f"{tag}/torch/{i}"], out[f"{tag}/fastopt/{i}"] = a, b
        resume("resume2")
        m = _sharded(mesh)
        try:
            ft.AdamW(m.parameters(), flat=True)
        except ValueError as e:
            out["flat_error"] = np.array(str(e))
    else:
        resume("resume1")
    if rank == 0:
        np.savez(os.path.join(out_dir, f"{phase}.npz"), **out)
    dist.barrier()
    dist.destroy_process_group()


def _launch(world, out, phase):
    run_gloo_workers(__file__, world, (world, out, phase), TIMEOUT_S, f"FSDP2 {phase}")
    return dict(np.load(out / f"{phase}.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    train = _launch(2, out, "train")
    resume1 = _launch(1, out, "resume1")
    return train, resume1


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("tag", ["reshard", "keep"])
def test_fsdp2_matches_torch_adamw_with_clipping(runs, tag):
    train, _ = runs
    init = [p.detach().numpy() for p in make_model().parameters()]
    n = len(init)
    for i in range(n):
        a, b = train[f"{tag}/torch/{i}"], train[f"{tag}/fastopt/{i}"]
        assert not np.allclose(b, init[i])                       # it trained
        assert _rel(b, a) <= 1e-5, (i, _rel(b, a))
    assert float(train[f"{tag}/last_norm"]) > CLIP             # the clipping acted


def test_fsdp2_state_is_dtensors_with_the_params_placements(runs):
    train, _ = runs
    assert bool(train["state_placements"]) and bool(train["state_local_shape"])


@pytest.mark.parametrize("tag,tol", [("resume2", 0.0), ("resume1", 1e-5)])
def test_dcp_checkpoint_resumes_in_world_sizes_2_and_1(runs, tag, tol):
    train, resume1 = runs
    got = train if tag == "resume2" else resume1
    for i in range(len(list(make_model().parameters()))):
        want = train[f"reshard/fastopt/{i}"]
        if tol == 0.0:
            np.testing.assert_array_equal(got[f"{tag}/param/{i}"], want)
        else:
            assert _rel(got[f"{tag}/param/{i}"], want) <= tol


def test_flat_over_dtensors_is_refused(runs):
    train, _ = runs
    assert "FSDP2" in str(train["flat_error"]) and "flat=False" in str(train["flat_error"])


def test_other_tensor_subclasses_are_refused_naming_the_class():
    import fastopt.torch as ft

    class Odd(torch.Tensor):
        pass

    p = torch.zeros(4).as_subclass(Odd)
    with pytest.raises(TypeError, match="Odd, a tensor subclass"):
        ft.AdamW([p])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
