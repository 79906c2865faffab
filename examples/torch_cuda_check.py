"""fastopt.torch on CUDA tensors against torch.optim on the same device (a GPU check).

Trains the same 100-tensor model for 300 steps with torch.optim.X and fastopt.torch.X
(plain and flat=True) on the GPU for every optimizer torch has, then moves a state dict
torch -> fastopt -> torch on the device, and steps on a non-default torch stream. Prints
one line per check; needs a GPU, torch with CUDA, CuPy and numba-cuda.

Run: ``python examples/torch_cuda_check.py [cuda|cpu]``.
"""
import sys
import time
import traceback

import numpy as np
import torch
from torch import nn

import fastopt.torch as ft

if not hasattr(np, "row_stack"):      # numba-cuda 0.2x still names np.row_stack (gone in NumPy 2.5)
    np.row_stack = np.vstack

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
CASES = {
    "SGD": dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Adagrad": dict(lr=0.02, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=1e-3),
    "Adam": dict(lr=1e-3, amsgrad=True, weight_decay=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "Adamax": dict(lr=2e-3, weight_decay=1e-3),
    "NAdam": dict(lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    "RAdam": dict(lr=1e-3, weight_decay=1e-3),
    "Adadelta": dict(lr=0.1, weight_decay=1e-3),
}


class Bank(nn.Module):
    def __init__(self, n=50, w=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(n))

    def forward(self, x):
        w = torch.stack([m.weight for m in self.layers])
        b = torch.stack([m.bias for m in self.layers])
        return torch.tanh(torch.einsum("ni,koi->nko", x, w) + b).mean(1)


def model():
    torch.manual_seed(0)
    return Bank().to(DEV)


g = torch.Generator().manual_seed(1)
DATA = [(torch.randn(8, 16, generator=g).to(DEV), torch.randn(8, 16, generator=g).to(DEV)) for _ in range(8)]


def train(m, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = DATA[s % 8]
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m


def err(a, b):
    with torch.no_grad():
        return max(float((p - q).norm() / p.norm()) for p, q in zip(a.parameters(), b.parameters()))


def check(name, fn):
    t = time.perf_counter()
    try:
        print(f"{name}: {fn()}  ({time.perf_counter() - t:.1f} s)", flush=True)
    except Exception:
        print(f"{name}: FAILED", flush=True)
        traceback.print_exc()


for name, hp in CASES.items():
    if name not in ft.OPTIMIZERS:
        continue

    def parity(name=name, hp=hp):
        mt = model()
        train(mt, getattr(torch.optim, name)(mt.parameters(), **hp), 300)
        mf = model()
        of = ft.OPTIMIZERS[name](mf.parameters(), **hp)
        train(mf, of, 300)
        ml = model()
        train(ml, ft.OPTIMIZERS[name](ml.parameters(), flat=True, **hp), 300)
        st = of.state[next(mf.parameters())]
        dev = {k: str(v.device) for k, v in st.items()}
        return f"300 steps vs torch.optim on {DEV}: max rel err {err(mt, mf):.2e}, flat {err(mt, ml):.2e}; state {dev}"
    check(f"parity {name}", parity)


def state_dicts():
    hp = dict(lr=1e-2, amsgrad=True)
    ref = model()
    train(ref, torch.optim.Adam(ref.parameters(), **hp), 20)
    a, b = model(), model()
    oa = torch.optim.Adam(a.parameters(), **hp)
    train(a, oa, 10)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            q.copy_(p)
    ob = ft.Adam(b.parameters(), flat=True, **hp)
    ob.load_state_dict(oa.state_dict())
    train(b, ob, 10, 10)
    c = model()
    oc = torch.optim.Adam(c.parameters(), **hp)
    with torch.no_grad():
        for p, q in zip(b.parameters(), c.parameters()):
            q.copy_(p)
    sd = ob.state_dict()
    oc.load_state_dict(sd)
    train(c, oc, 5, 20)
    return (f"torch->fastopt(flat) err {err(ref, b):.2e}; state device {sd['state'][0]['exp_avg'].device}; "
            f"fastopt->torch continues")


check("state dicts torch<->fastopt", state_dicts)


def side_stream():
    m_t, m_f = model(), model()
    o_t = torch.optim.Adam(m_t.parameters(), lr=1e-2)
    o_f = ft.Adam(m_f.parameters(), lr=1e-2, flat=True)
    s = torch.cuda.Stream() if DEV == "cuda" else None
    ctx = torch.cuda.stream(s) if s is not None else __import__("contextlib").nullcontext()
    with ctx:
        train(m_t, o_t, 50)
        train(m_f, o_f, 50)
    if s is not None:
        torch.cuda.synchronize()
    return f"50 steps on a side stream: max rel err {err(m_t, m_f):.2e}"


check("non-default torch stream", side_stream)
