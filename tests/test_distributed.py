"""fastopt.torch on torch's distributed engine: DistributedDataParallel and
ZeroRedundancyOptimizer (optimizer state sharded across ranks), gloo, two processes on
this machine over loopback only.

Both ranks train on their half of each batch; DDP averages the gradients, so the run is
the single-process run on the whole batch, and must end with the same parameters. The
workers are this file run as a script (``python test_distributed.py RANK OUT_DIR``),
started by one module-scoped fixture with a hard timeout.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from cases import run_gloo_workers

torch = pytest.importorskip("torch")
nn = torch.nn

STEPS, RELOAD_AT, BATCH, LR = 30, 20, 16, 1e-2
SCENARIOS = ("ddp", "ddp_flat", "ddp_bucket_view", "ddp_bucket_view_flat", "zero", "zero_flat",
             "zero_bucket_view", "zero_bucket_view_flat", "fsdp1", "fsdp1_flat")
TIMEOUT_S = 180


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def train_steps(model, opt, steps, start=0, shard=None, set_to_none=True):
    for s in range(start, start + steps):
        x, y = batch(s)
        if shard is not None:
            rank, world = shard
            x, y = x[rank::world], y[rank::world]
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def single_process(flat=False):
    """The reference: one process, the whole batch, fastopt.torch.Adam."""
    import fastopt.torch as ft
    model = make_model()
    opt = ft.Adam(model.parameters(), lr=LR, flat=flat)
    train_steps(model, opt, STEPS)
    return [p.detach().numpy().copy() for p in model.parameters()], opt.state_dict()


# -- the worker ---------------------------------------------------------------------------------
def _worker(rank: int, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastopt.torch as ft

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    out = {}

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def make_opt(scenario, params, cls):
        kw = {"flat": scenario.endswith("_flat")} if cls is ft.Adam else {}
        if scenario.startswith(("ddp", "fsdp1")):
            return cls(params, lr=LR, **kw)
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=LR,
                                       parameters_as_bucket_view=scenario.startswith("zero_bucket_view"),
                                       **kw)

    # Each scenario with fastopt.torch.Adam; each wrapper (flat or not) also with
    # torch.optim.Adam, the same steps in the same run ("torch:<wrapper>").
    runs = [(s, ft.Adam) for s in SCENARIOS]
    runs += [(s, torch.optim.Adam) for s in SCENARIOS if not s.endswith("_flat")]
    for scenario, cls in runs:
        tag = scenario if cls is ft.Adam else f"torch:{scenario}"
        print(f"rank {rank}: {tag}", flush=True)
        model = make_model()
        if scenario.startswith("fsdp1"):
            # FSDP1 flattens and shards the params itself; each rank steps its shard.
            ddp = FSDP(model, use_orig_params=False, device_id=torch.device("cpu"))
        else:
            ddp = DDP(model, gradient_as_bucket_view=scenario.startswith("ddp_bucket_view"))
        opt = make_opt(scenario, ddp.parameters(), cls)
        if scenario.startswith("zero") and cls is ft.Adam:
            assert isinstance(opt.optim, ft.Adam)
            out[f"{scenario}/local_params"] = np.array(sum(len(g["params"]) for g in opt.optim.param_groups))
        # Every wrapper's own zero_grad (set_to_none=True): flat=True adopts what it does.
        set_to_none = True
        train_steps(ddp, opt, RELOAD_AT, shard=(rank, 2), set_to_none=set_to_none)
        if scenario.startswith("zero"):
            # Gather the sharded state on rank 0, then resume from it in a fresh optimizer:
            # ZeroRedundancyOptimizer.load_state_dict writes the local optimizer's state.
            opt.consolidate_state_dict(to=0)
            box = [opt.state_dict() if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            sd = box[0]
            for i, st in sd["state"].items():
                for k, v in st.items():
                    out[f"{tag}/state/{i}/{k}"] = v.numpy()
            opt = make_opt(scenario, ddp.parameters(), cls)
            opt.load_state_dict(sd)
        train_steps(ddp, opt, STEPS - RELOAD_AT, start=RELOAD_AT, shard=(rank, 2), set_to_none=set_to_none)
        if scenario.startswith("fsdp1"):
            with FSDP.summon_full_params(ddp):
                # (clone first: .numpy() would pin the unsharded storage FSDP frees on exit)
                for i, p in enumerate(ddp.module.parameters()):
                    out[f"{tag}/param/{i}"] = p.detach().clone().numpy()
            continue
        for i, p in enumerate(model.parameters()):
            out[f"{tag}/param/{i}"] = p.detach().numpy().copy()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    dist.barrier()
    dist.destroy_process_group()


# -- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_gloo_workers(__file__, 2, (out,), TIMEOUT_S, "DDP/ZeRO/FSDP1")
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


@pytest.fixture(scope="module")
def reference():
    return single_process()


def _assert_close(a, b, tol=1e-5, what=""):
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_end_with_the_single_process_params(ranks, reference, scenario):
    ref_params, _ = reference
    init = [p.detach().numpy() for p in make_model().parameters()]
    for i, ref in enumerate(ref_params):
        assert not np.allclose(ref, init[i])                                   # it trained
        for r in range(2):
            _assert_close(ranks[r][f"{scenario}/param/{i}"], ref, what=f"{scenario} rank {r} param {i}")
        np.testing.assert_array_equal(ranks[0][f"{scenario}/param/{i}"], ranks[1][f"{scenario}/param/{i}"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_match_torch_adam_in_the_same_run(ranks, scenario):
    """fastopt.torch.Adam (flat or not) inside each wrapper against torch.optim.Adam inside
    the same wrapper, stepped in the same worker processes."""
    base = scenario.removesuffix("_flat")
    n = len(list(make_model().parameters()))
    for r in range(2):
        for i in range(n):
            _assert_close(ranks[r][f"{scenario}/param/{i}"], ranks[r][f"torch:{base}/param/{i}"],
                          what=f"{scenario} vs torch.optim.Adam, rank {r} param {i}")


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("zero")])
def test_zero_shards_state_and_consolidates_it(ranks, scenario):
    n_params = len(list(make_model().parameters()))
    local = [int(ranks[r][f"{scenario}/local_params"]) for r in range(2)]
    assert sum(local) == n_params and min(local) > 0          # each rank steps only its shard
    # The consolidated state after RELOAD_AT steps equals the single-process optimizer's.
    import fastopt.torch as ft
    model = make_model()
    opt = ft.Adam(model.parameters(), lr=LR)
    train_steps(model, opt, RELOAD_AT)
    sd = opt.state_dict()
    for i in range(n_params):
        assert float(ranks[0][f"{scenario}/state/{i}/step"]) == RELOAD_AT
        for k in ("exp_avg", "exp_avg_sq"):
            _assert_close(ranks[0][f"{scenario}/state/{i}/{k}"], sd["state"][i][k].numpy(), tol=1e-4,
                          what=f"{scenario} state {i} {k}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2])
