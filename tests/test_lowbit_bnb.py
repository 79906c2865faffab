"""fastopt's ``state_format="int8"`` optimizers against bitsandbytes' 8-bit optimizers,
stepped side by side on the CPU (bitsandbytes >= 0.50 has a CPU path for them:
``bitsandbytes/backends/cpu/ops.py``, ``_optimizer_update_8bit_blockwise_cpu``).

Same params, same gradients (torch tensors made from the same NumPy arrays): Adam8bit
against fo.Adam, AdamW8bit against fo.AdamW, Lion8bit against fo.Lion, SGD8bit with
momentum against fo.SGD, AdEMAMix8bit against fo.AdEMAMix (decoupled decay, both
warm-ups over 50 steps), RMSprop8bit against fo.RMSprop and Adagrad8bit against
fo.Adagrad; a tensor of 9797 elements (38 blocks of 256 and a partial one), one of
exactly ``min_8bit_size`` (4096, int8 in both) and one of 300 (float32 state in both).
Loading: bitsandbytes' ``state_dict()`` through ``lowbit.from_bitsandbytes``
(AdEMAMix8bit's ``state1`` stacks exp_avg and exp_avg_slow).

RMSprop8bit and Adagrad8bit keep their non-negative state with bitsandbytes' signed
map, fastopt with its unsigned one (twice as fine): their codes are not comparable, so
each side's state is decoded with its own map and absmax and the two are held to what
both maps' quantization errors explain (the comment above :func:`_block_absmax`).

AdEMAMix8bit's moments are ``m.mul_(b).add_(g, alpha=1 - b)`` with the two coefficients
rounded to float32 apart (their sum is 1 + 1.29e-8 for b = 0.999), fastopt's
``lerp(m, g, 1 - b)`` decays by exactly 1 - F32(1 - b): the slow moment drifts apart by
that excess each step it remembers (measured: fastopt's absmax 1.1e-6 relative below
bitsandbytes' after 100 steps at b3 = 0.999 without warm-up; at b3 = 1 - 2^-10, whose
coefficients sum to 1 exactly, within +-5e-7 either way). The absmax tolerance adds the
drift this excess explains (:func:`_ema_excess`: 1.2e-6 for the slow moment after 100
steps, 2.2e-7 for the fast one).

Two ways of running bitsandbytes, because bitsandbytes 0.50's CPU quantizer is not the
nearest-code quantizer its blockwise scheme describes:

- *reference quantizer* (the bit-for-bit comparisons): bitsandbytes' optimizer step as
  it ships (dequantize, torch ops, requantize), with only its requantization,
  ``_quant_blockwise_fp32_direct``, replaced by :func:`_nearest_code_quantize`, the
  quantizer of bitsandbytes <= 0.49's CPU backend (csrc/common.cpp ``quantize_block``:
  per block absmax, divide, binary search, the nearer of two neighbours, ties to the
  lower code; the signed map's code 0 set to -1.0 in place), which is also what
  fastopt implements. Here the codes must agree for >= 99.9% of elements after 1, 10
  and 100 steps (measured: at every step at most one code of a tensor differs, e.g.
  one exp_avg code of Adam's 9797 for steps 31-46: a value within float32 rounding of
  a midpoint, divided by the absmax there, multiplied by its reciprocal here), absmax
  to 1e-6 relative, params to a bound derived from the states (the comment above
  :func:`_run`).
- *as shipped* (bitsandbytes 0.50's own quantizer): it maps ``x`` to the code nearest to
  the centre of ``x``'s bin among 65536 equal bins of [-1, 1] (csrc/cpu_ops.cpp
  ``build_quantize_lut``), not the code nearest to ``x``; and it no longer sets the
  signed map's code 0 to -1.0 (it stays -0.99297, so a block's largest negative value
  decodes 0.7% short), and it writes code 0 for an all-zero block. After one Adam step
  0.2% of first-moment codes and 3% of second-moment codes differ from fastopt's (every
  difference within one bin, tested below); the first moments then drift apart through
  the absmax (83% of codes equal after 10 steps, 50% after 100), mostly from that code
  0. Tested: every bitsandbytes code is the one its bin explains, the maps agree but
  for that code 0, params stay within what the two runs' states explain, and its state
  dicts load.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable

import numpy as np
import pytest

import fastopt as fo
from fastopt import lowbit
from fastopt.kernels import blockwise

torch = pytest.importorskip("torch", reason="torch not installed: bitsandbytes' 8-bit "
                            "optimizers are not compared")


def _import_bitsandbytes():
    # bitsandbytes' CPU backend tries `from kernels import get_kernel` (the Hugging Face
    # hub package) at import; from the repo root that finds fastopt's own top-level
    # kernels/ folder and logs a warning. Hide both: no second import of kernels/ under
    # another name, no warning (it is only about a 4-bit matmul kernel).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    blocked = "kernels" not in sys.modules
    if blocked:
        sys.modules["kernels"] = None      # import of "kernels" raises ImportError
    try:
        return pytest.importorskip(
            "bitsandbytes", minversion="0.50",
            reason="bitsandbytes >= 0.50 not installed (its 8-bit optimizers' CPU path is "
                   "what fastopt's int8 state is compared with)")
    finally:
        if blocked and sys.modules.get("kernels", 0) is None:
            del sys.modules["kernels"]


bnb = _import_bitsandbytes()
bnb_functional = pytest.importorskip("bitsandbytes.functional")

SIZES = [(97, 101), (64, 64), (300,)]    # 9797 (not a multiple of 256), 4096, under 4096
CHECKPOINTS = (1, 10, 100)
SIGNED = blockwise.dynamic_map(blockwise.SIGNED)
UNSIGNED = blockwise.dynamic_map(blockwise.UNSIGNED)
F32 = np.float32


def _params(sizes=SIZES):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(F32) for s in sizes]


def _grads(step, sizes=SIZES):
    # a new scale for each tensor at each step, 10^-3 ... 10^1: blocks' absmax change a
    # lot from step to step, so the small codes of both maps are used
    rng = np.random.default_rng(1000 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(F32) for s in sizes]


# -- bitsandbytes' quantizer, nearest-code ---------------------------------------------------
def _nearest_code_quantize(A, code, absmax_out, out_uint8, blocksize):
    """``_quant_blockwise_fp32_direct`` with bitsandbytes <= 0.49's CPU quantizer
    (csrc/cpu_ops.cpp ``quantize_cpu`` + csrc/common.cpp ``quantize_block``), in torch:
    the signed map's code 0 set to -1.0 in place (the map bitsandbytes then decodes
    with too); per block absmax = max |x|; ``x / absmax``; binary search for the code at
    or below; the nearer of it and the next, ties to the lower. An all-zero block (0/0
    there) takes the code of 0."""
    if code[0] < 0:
        code[0] = -1.0
    flat = A.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    normed = torch.where(torch.isnan(normed), torch.zeros_like(normed), normed)
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 254)
    idx = idx + ((normed - code[idx + 1]).abs() < (normed - code[idx]).abs()).long()
    out_uint8.copy_(idx.to(torch.uint8).view(out_uint8.shape))
    absmax_out.copy_(absmax)


@pytest.fixture
def nearest_code(monkeypatch):
    """bitsandbytes' CPU 8-bit step with :func:`_nearest_code_quantize` requantizing."""
    ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")
    if not hasattr(ops, "_quant_blockwise_fp32_direct"):
        pytest.skip(f"bitsandbytes {bnb.__version__}'s CPU backend has no "
                    "_quant_blockwise_fp32_direct to give the nearest-code quantizer")
    monkeypatch.setattr(ops, "_quant_blockwise_fp32_direct", _nearest_code_quantize)


# -- the pairs, and each one's update in float64 ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pair:
    bnb_class: str
    fo_class: str
    kw: dict                           # the same keywords for both
    # (p, g, states, step, kw) -> (param change, new states), float64; ``states`` are
    # fastopt's columns in order, ``kw`` is ``kw`` and ``bnb_kw`` (bitsandbytes' names)
    update: Callable
    bnb_kw: dict = dataclasses.field(default_factory=dict)   # bitsandbytes' alone
    fo_kw: dict = dataclasses.field(default_factory=dict)    # fastopt's alone
    # where bitsandbytes keeps each fastopt column, in order: (k of state<k>, row of a
    # stacked state<k> or None)
    rows: tuple = ((1, None), (2, None))
    # bitsandbytes quantizes each column with fastopt's map (codes comparable); if not,
    # the decoded states are compared (:func:`_check_decoded`)
    same_maps: bool = True
    # (kw, step) -> per column ``(b, excess)``: the EMA's decay b at that step and how
    # far bitsandbytes' coefficients sum from 1 where fastopt's lerp sums to 1 exactly
    # (:func:`_ema_excess`); None: no drift
    drift: Callable | None = None

    @property
    def oracle_kw(self):
        return {**self.kw, **self.bnb_kw}

    def bnb(self, tensors):
        return getattr(bnb.optim, self.bnb_class)(tensors, **self.kw, **self.bnb_kw)

    def fo(self, arrays, **changed):
        return getattr(fo, self.fo_class)(arrays, state_format="int8",
                                          **{**self.kw, **self.fo_kw, **changed})

    def make(self, arrays, tensors):
        return self.bnb(tensors), self.fo(arrays)

    def bnb_map(self, j):
        """The map bitsandbytes quantizes fastopt's column ``j`` with: ``qmap1`` is its
        signed map, ``qmap2`` its unsigned one."""
        return SIGNED if self.rows[j][0] == 1 else UNSIGNED


def _adam_update(p, g, s, t, kw):
    """bitsandbytes' 8-bit Adam (and fastopt's, decoupled decay as AdamW; Adam runs with
    weight_decay=0): m, v updated, bias-corrected, ``eps`` added to sqrt(v) / c2."""
    (b1, b2), lr, eps, wd = kw["betas"], kw["lr"], kw["eps"], kw["weight_decay"]
    m = b1 * s[0] + (1 - b1) * g
    v = b2 * s[1] + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
    return -lr * wd * p - lr / (1 - b1 ** t) * m / denom, (m, v)


def _lion_update(p, g, s, t, kw):
    (b1, b2), lr, wd = kw["betas"], kw["lr"], kw["weight_decay"]
    return (-lr * wd * p - lr * np.sign(b1 * s[0] + (1 - b1) * g),
            (b2 * s[0] + (1 - b2) * g,))


def _sgd_update(p, g, s, t, kw):
    """torch.optim.SGD's momentum (dampening 0): the buffer is the gradient at step 1."""
    g = g + kw["weight_decay"] * p
    buf = g if t == 1 else kw["momentum"] * s[0] + g
    return -kw["lr"] * buf, (buf,)


def _ademamix_schedules(kw, t):
    """``(alpha_t, beta3_t)``: the paper's warm-ups (arXiv:2409.03137, Algorithm 1),
    alpha linear over ``t_alpha`` steps, beta3 linear in the slow EMA's half-life over
    ``t_beta3`` steps; off when None."""
    (b1, _, b3), alpha = kw["betas"], kw["alpha"]
    if kw.get("t_alpha"):
        alpha = min(t * alpha / kw["t_alpha"], alpha)
    if kw.get("t_beta3"):
        s = t / kw["t_beta3"]
        ln1, ln3 = np.log(b1), np.log(b3)
        b3 = min(np.exp(ln1 * ln3 / ((1 - s) * ln3 + s * ln1)), b3)
    return alpha, b3


def _ema_excess(b):
    """``F32(b) + F32(1 - b) - 1``: bitsandbytes' EMA ``m.mul_(b).add_(g, alpha=1 - b)``
    rounds its two coefficients to float32 apart, so they do not sum to 1 (1.29e-8 for
    b = 0.999, -1.66e-8 for 0.9999, -2.24e-8 for 0.9); fastopt's ``lerp(m, g, 1 - b)``
    decays by exactly 1 - F32(1 - b). Its moment is then a factor (1 + excess) larger
    each step: the relative difference D of the two moments grows as
    ``D = b D + |excess|`` (what the EMA remembers of it), at most |excess| / (1 - b)."""
    return abs(float(F32(b)) + float(F32(1 - b)) - 1)


def _ademamix_drift(kw, t):
    """exp_avg (lerp with b1), exp_avg_sq (``b2 v + (1 - b2) g^2`` on both sides: no
    excess), exp_avg_slow (lerp with beta3_t)."""
    b1, b3 = kw["betas"][0], _ademamix_schedules(kw, t)[1]
    return (b1, _ema_excess(b1)), (0.0, 0.0), (b3, _ema_excess(b3))


def _ademamix_update(p, g, s, t, kw):
    """AdEMAMix (decoupled decay): fast m1 and slow m2 momenta, Adam's bias-corrected
    second moment; fastopt's column order (exp_avg, exp_avg_sq, exp_avg_slow)."""
    (b1, b2, _), lr, eps, wd = kw["betas"], kw["lr"], kw["eps"], kw["weight_decay"]
    alpha, b3 = _ademamix_schedules(kw, t)
    m1 = b1 * s[0] + (1 - b1) * g
    nu = b2 * s[1] + (1 - b2) * g * g
    m2 = b3 * s[2] + (1 - b3) * g
    denom = np.sqrt(nu) / np.sqrt(1 - b2 ** t) + eps
    return -lr * wd * p - lr * (m1 / (1 - b1 ** t) + alpha * m2) / denom, (m1, nu, m2)


def _rmsprop_update(p, g, s, t, kw):
    """torch.optim.RMSprop without momentum, not centered; L2 weight decay."""
    g = g + kw["weight_decay"] * p
    v = kw["alpha"] * s[0] + (1 - kw["alpha"]) * g * g
    return -kw["lr"] * g / (np.sqrt(v) + kw["eps"]), (v,)


def _adagrad_update(p, g, s, t, kw):
    """torch.optim.Adagrad without lr decay, initial accumulator 0; L2 weight decay."""
    g = g + kw["weight_decay"] * p
    v = s[0] + g * g
    return -kw["lr"] * g / (np.sqrt(v) + kw["eps"]), (v,)


PAIRS = {
    "Adam": Pair("Adam8bit", "Adam", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.0), _adam_update),
    "AdamW": Pair("AdamW8bit", "AdamW", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                             weight_decay=0.1), _adam_update),
    "Lion": Pair("Lion8bit", "Lion", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
                 _lion_update, rows=((1, None),)),
    "SGD": Pair("SGD8bit", "SGD", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2),
                _sgd_update, rows=((1, None),)),
    # bitsandbytes' decay is decoupled; its two warm-ups both over 50 steps are
    # fastopt's one t_alpha_beta3 (100 steps: 50 warming up, 50 at alpha and beta3)
    "AdEMAMix": Pair("AdEMAMix8bit", "AdEMAMix",
                     dict(lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0, eps=1e-8,
                          weight_decay=0.1),
                     _ademamix_update, bnb_kw=dict(t_alpha=50, t_beta3=50),
                     fo_kw=dict(weight_decouple=True, t_alpha_beta3=50),
                     rows=((1, 0), (2, None), (1, 1)), drift=_ademamix_drift),
    # one non-negative state, which bitsandbytes quantizes with its signed map and
    # fastopt with its unsigned one
    "RMSprop": Pair("RMSprop8bit", "RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8,
                                                   weight_decay=1e-2),
                    _rmsprop_update, rows=((1, None),), same_maps=False),
    "Adagrad": Pair("Adagrad8bit", "Adagrad", dict(lr=1e-2, eps=1e-10, weight_decay=1e-2),
                    _adagrad_update, rows=((1, None),), same_maps=False),
}


# -- reading both sides' state ------------------------------------------------------------------
def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _fo_columns(opt, i):
    """fastopt's state column names of param ``i``, in order."""
    return [c.name for c in opt.spec.columns if c.name in opt.state[i]]


def _bnb_column(pair, st, j):
    """bitsandbytes' ``(values, absmax, qmap)`` of fastopt's column ``j`` (absmax and
    qmap None for float32 state): a row of ``state<k>`` where bitsandbytes stacks two."""
    k, row = pair.rows[j]
    s = _numpy(st[f"state{k}"])
    if s.dtype != np.uint8:
        return (s if row is None else s[row]), None, None
    absmax = _numpy(st[f"absmax{k}"])
    if row is not None:
        s, absmax = s[row], absmax[row]
    return s, absmax, _numpy(st[f"qmap{k}"])


def _decoded_bnb(pair, st, j):
    """bitsandbytes' state of fastopt's column ``j`` in float64, decoded with its own map."""
    s, absmax, table = _bnb_column(pair, st, j)
    if absmax is None:
        return s.astype(np.float64)
    return lowbit.decode(s, absmax, blockwise.BLOCK, table).astype(np.float64)


def _fo_map(opt, name):
    return UNSIGNED if opt.spec.column(name).unsigned else SIGNED


def _decoded_fo(opt, i, name):
    st = opt.state[i]
    if name + lowbit.ABSMAX not in st:
        return np.asarray(st[name], dtype=np.float64)
    return lowbit.decode(st[name], st[name + lowbit.ABSMAX], blockwise.BLOCK,
                         _fo_map(opt, name)).astype(np.float64)


def _states(pair, bopt, fopt, tensors, i):
    """``(bnb's, fastopt's)`` state columns of param ``i`` in fastopt's order, in
    float64; zeros before the first step."""
    st = bopt.state.get(tensors[i], {})
    if "state1" not in st:
        z = np.zeros(tensors[i].shape)
        return (z,) * len(pair.rows), (z,) * len(pair.rows)
    names = _fo_columns(fopt, i)
    return (tuple(_decoded_bnb(pair, st, j) for j in range(len(names))),
            tuple(_decoded_fo(fopt, i, n) for n in names))


def _frac_equal(a, b) -> float:
    return float(np.mean(_numpy(a).ravel() == _numpy(b).ravel()))


# The param tolerance (accumulated per element by _run).
#
# Where both runs hold the same state (codes and absmax equal), their updates differ by
# float32 rounding only: each run rounds each step's result to float32 (half an ulp of
# |p| each: 2 * spacing(|p|) per step leaves room) and computes the update in another
# order (a few ulps of it: 1e-5 of it leaves room).
# Where an element's code differs by one (its value within rounding of the midpoint
# between two map values: bitsandbytes divides by the absmax, fastopt multiplies by its
# reciprocal), its decoded moment differs by the map's spacing there times the block's
# absmax (at most 0.0211 * absmax1 for the signed map, between -1 and -0.979, 0.0141
# on its positive side; 0.0070 * absmax2 for the unsigned one), and that element's update differs by what this makes of it: for SGD
# lr * momentum * spacing * absmax1; for Adam lr / c1 * b1 * spacing * absmax1 / denom
# (and the second moment's spacing through denom, large where v is near 0); for Lion 0,
# or 2 lr where the sign flips. _run computes exactly that per element and step: the
# update in float64 from each run's decoded state (with the same param and gradient),
# and adds the difference of the two to the element's tolerance. So the bound says the
# params differ by no more than their states' differences and rounding explain; the
# states themselves are held to >= 99.9% equal codes. (Measured: max |dp| 8.0e-4 of an
# explained 8.2e-4 for Adam's one element whose exp_avg code differed for 15 steps;
# test_param_tolerance_catches_a_different_update shows the bound is no blanket.)
@dataclasses.dataclass
class Track:
    """What :func:`_run` knows of one param after a step: its accumulated param
    tolerance, the values each run quantized at that step (float64, from its own
    decoded state and param: ``(bnb's, fastopt's)``, a tuple of columns each), and per
    column the accumulated drift of bitsandbytes' EMA coefficients (``Pair.drift``)."""
    tol: np.ndarray
    pre: tuple = ((), ())
    drift: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))


def _run(pair, steps, checks, opts=None, start=1, sizes=SIZES):
    """Steps bitsandbytes' and fastopt's optimizers side by side (``opts(arrays,
    tensors)`` makes them, by default ``pair.make``) from step ``start``; at each step
    accumulates each param's tolerance; after each step in ``checks`` calls
    ``checks[step](bopt, fopt, tensors, arrays, track)`` (a :class:`Track` per param)."""
    arrays = _params(sizes)
    tensors = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    bopt, fopt = opts(arrays, tensors) if opts else pair.make(arrays, tensors)
    track = [Track(np.zeros(a.shape)) for a in arrays]
    for step in range(start, start + steps):
        grads = _grads(step, sizes)
        for i, (a, g) in enumerate(zip(arrays, grads)):
            bs, fs = _states(pair, bopt, fopt, tensors, i)
            p, g64 = a.astype(np.float64), g.astype(np.float64)
            theirs = pair.update(p, g64, bs, step, pair.oracle_kw)[0]
            mine, my_pre = pair.update(p, g64, fs, step, pair.oracle_kw)
            # what bitsandbytes quantizes: from its own state and param (weight decay)
            their_pre = pair.update(_numpy(tensors[i]).astype(np.float64), g64, bs, step,
                                    pair.oracle_kw)[1]
            # the param tolerance (above): explained difference plus rounding
            track[i].tol += np.abs(theirs - mine) + 2 * np.spacing(np.abs(a)) \
                + 1e-5 * np.abs(mine)
            track[i].pre = (their_pre, my_pre)
            if pair.drift:
                for j, (b, excess) in enumerate(pair.drift(pair.oracle_kw, step)):
                    track[i].drift[j] = b * track[i].drift[j] + excess
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g.copy())
        bopt.step()
        fopt.step(grads)
        if step in checks:
            checks[step](bopt, fopt, tensors, arrays, track)
    return bopt, fopt, tensors, arrays, track


def _check_against(pair, step, frac_min, absmax_rtol, record, bins=0.0):
    """A check for :func:`_run`: each int8 column's codes >= ``frac_min`` equal and its
    absmax within ``absmax_rtol`` (None: not compared) of bitsandbytes' (for pairs with
    different maps, :func:`_check_decoded` instead, ``bins`` the half-width of
    bitsandbytes' quantizer's bins: 0 for the nearest-code one), float32 columns within
    rounding, params within their tolerance."""
    def check(bopt, fopt, tensors, arrays, track):
        for i, t in enumerate(tensors):
            st = bopt.state[t]
            for j, name in enumerate(_fo_columns(fopt, i)):
                theirs, their_absmax, _ = _bnb_column(pair, st, j)
                mine = fopt.state[i][name]
                if their_absmax is None:
                    # float32 state: the same recurrences, rounded in another order
                    assert mine.dtype == np.float32 and theirs.dtype == np.float32
                    np.testing.assert_allclose(mine, theirs, rtol=1e-5,
                                               atol=1e-6 * float(np.abs(theirs).max()),
                                               err_msg=f"{name}, step {step}")
                elif pair.same_maps:
                    frac = _frac_equal(theirs, mine)
                    record[(step, i, name)] = frac
                    assert frac >= frac_min, (pair.bnb_class, step, i, name, frac)
                    if absmax_rtol is not None:     # and the EMAs' drift (_ema_excess)
                        np.testing.assert_allclose(
                            fopt.state[i][name + lowbit.ABSMAX], their_absmax,
                            rtol=absmax_rtol + track[i].drift[j], atol=0,
                            err_msg=f"absmax of {name}, step {step}")
                else:
                    _check_decoded(pair, st, fopt, i, j, name, track[i].pre, step, record,
                                   bins)
            err = np.abs(_numpy(t).astype(np.float64) - arrays[i])
            record[(step, i, "param")] = float(err.max())
            tol = track[i].tol
            assert np.all(err <= tol), (pair.bnb_class, step, i, float(err.max()),
                                        float(tol.ravel()[np.argmax(err - tol)]))
    return check


# The decoded-state bound (pairs whose maps differ: RMSprop8bit and Adagrad8bit keep
# their non-negative state with the signed map, fastopt with the unsigned one).
#
# Each run quantizes its own value x (from its own previous state and the same
# gradient; _run computes both in float64): its absmax A is max |x| over the block, its
# code the map value nearest to x / A, so its decoded state is q = x + e with
# |e| <= h = A * gap(x / A) / 2, gap(y) the spacing of the map's two values around y.
# For y in [0, 1] the signed map has 128 values (spacings 5.5e-7 near 0 up to 0.0141
# below 0.993), the unsigned map 256 (3.25e-7 up to 0.0070): fastopt's h is about half
# of bitsandbytes'. Hence, per element and step,
#     |q_b - q_f| <= |x_b - x_f| + h_b + h_f,
# where x_b - x_f is what the previous states explain (0 at step 1, where both runs
# quantize the same value; alpha (q_b - q_f) before for RMSprop, q_b - q_f for Adagrad).
# Each side is also held to its own part: A equal to max |x| of its block (to 1e-6,
# float32 against float64 arithmetic) and |q - x| <= h. That is what fails for a wrong
# map (an unsigned code read in the signed map is off by up to half the range) or a
# wrong absmax. Rounding: both compute x in float32 (a few ulps of A: 1e-6 A on each
# side). bitsandbytes 0.50's own quantizer picks the code nearest to some y' within
# ``bins`` (1.01 / 65535, half a bin of 65536 of [-1, 1]) of y = x / A: its error is
# at most ``bins`` plus half the largest spacing around y' (near 0, where the signed
# map's spacings are under a bin, several codes away).
def _block_absmax(x):
    flat = np.abs(x).ravel()
    padded = np.zeros(lowbit.n_blocks(flat.size, blockwise.BLOCK) * blockwise.BLOCK)
    padded[:flat.size] = flat
    return padded.reshape(-1, blockwise.BLOCK).max(axis=1)


def _quantization_error(x, absmax, table, bins):
    """The bound h above on |q - x| for each element of ``x`` (float64), its block's
    stored ``absmax`` and the ``table`` it is coded in."""
    a = np.repeat(absmax.astype(np.float64), blockwise.BLOCK)[:x.size].reshape(x.shape)
    y = np.divide(x, a, out=np.zeros_like(x), where=a > 0)
    t = np.asarray(table, dtype=np.float64)

    def half_gap(y):
        k = np.clip(np.searchsorted(t, y, side="right") - 1, 0, len(t) - 2)
        return 0.5 * (t[k + 1] - t[k])

    # the map's spacings grow with |y|: the largest around y' is at an end of y +- bins
    gap = np.maximum(half_gap(np.clip(y - bins, -1, 1)), half_gap(np.clip(y + bins, -1, 1)))
    return a * (gap + bins + 1e-6)


def _check_decoded(pair, st, fopt, i, j, name, pre, step, record, bins):
    """Column ``name`` (``j``) of param ``i`` against the bound above (``pre``: the
    values both runs quantized, :class:`Track`)."""
    _, their_absmax, their_map = _bnb_column(pair, st, j)
    my_absmax = fopt.state[i][name + lowbit.ABSMAX]
    x_b, x_f = pre[0][j], pre[1][j]
    q_b, q_f = _decoded_bnb(pair, st, j), _decoded_fo(fopt, i, name)
    h_b = _quantization_error(x_b, their_absmax, their_map, bins)
    h_f = _quantization_error(x_f, my_absmax, _fo_map(fopt, name), 0.0)
    for who, x, q, absmax, h in (("bitsandbytes", x_b, q_b, their_absmax, h_b),
                                 ("fastopt", x_f, q_f, my_absmax, h_f)):
        np.testing.assert_allclose(absmax, _block_absmax(x), rtol=1e-6, atol=0,
                                   err_msg=f"{who}'s absmax of {name}, step {step}")
        assert np.all(np.abs(q - x) <= h), (who, name, step, float(np.max(np.abs(q - x) - h)))
    bound = np.abs(x_b - x_f) + h_b + h_f
    diff = np.abs(q_b - q_f)
    worst = int(np.argmax(diff - bound))
    record[(step, i, f"{name} max|dq|")] = float(diff.max())
    record[(step, i, f"{name} bound there")] = float(bound.ravel()[np.argmax(diff)])
    assert np.all(diff <= bound), (pair.bnb_class, step, i, name, float(diff.ravel()[worst]),
                                   float(bound.ravel()[worst]))


def _report(title, record):
    """The measured fractions of equal codes and largest param differences (pytest -s)."""
    print(f"\n{title}: " + ", ".join(
        f"step {s} p{i} max|dp| {v:.2g}" if k == "param" else f"step {s} p{i} {k} {v:.5f}"
        for (s, i, k), v in sorted(record.items())))


# -- the side-by-side runs -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_steps_match_bitsandbytes_with_nearest_code_quantizer(name, nearest_code):
    """1, 10, 100 steps: codes >= 99.9% equal, absmax within 1e-6 (and the drift of
    bitsandbytes' EMA coefficients, :func:`_ema_excess`), or for RMSprop8bit and
    Adagrad8bit the decoded states within the bound above :func:`_check_decoded`;
    params within the tolerance the states explain (above ``_run``); the maps after a
    step are fastopt's."""
    pair = PAIRS[name]
    record = {}
    # absmax: the max |value| of a block, stored exactly by both (code 0 or 255); the
    # two runs compute that value in a different order: a few float32 ulps (1.2e-7)
    checks = {s: _check_against(pair, s, 0.999, 1e-6, record) for s in CHECKPOINTS}
    bopt, _, tensors, _, _ = _run(pair, max(CHECKPOINTS), checks)
    st = bopt.state[tensors[0]]
    assert np.array_equal(_numpy(st["qmap1"]).view(np.uint32), SIGNED.view(np.uint32))
    if "qmap2" in st:
        assert np.array_equal(_numpy(st["qmap2"]).view(np.uint32), UNSIGNED.view(np.uint32))
    _report(f"{pair.bnb_class} vs fo.{pair.fo_class} (nearest-code quantizer)", record)


def test_param_tolerance_catches_a_different_update(nearest_code):
    """The explained tolerance is no blanket: fastopt's Adam with another eps (1e-6, the
    codes then still agree nearly everywhere) is out of it within 10 steps."""
    pair = PAIRS["Adam"]

    def opts(arrays, tensors):
        return pair.bnb(tensors), pair.fo(arrays, eps=1e-6)

    with pytest.raises(AssertionError):
        _run(pair, 10, {10: _check_against(pair, 10, 0.0, None, {})}, opts=opts)


# -- bitsandbytes 0.50 as shipped -----------------------------------------------------------------
def _first_values(pair, p, g):
    """The float32 values bitsandbytes quantizes at step 1 (its state starts at 0), one
    array per fastopt column, computed with its torch ops."""
    p, g = torch.from_numpy(p), torch.from_numpy(g)
    zero = torch.zeros_like(g)
    kw = pair.oracle_kw

    def ema(b, x):
        return zero.clone().mul_(b).add_(x, alpha=1 - b)

    def ema_sq(b, x):
        return zero.clone().mul_(b).addcmul_(x, x, value=1 - b)

    if pair.update is _adam_update:
        return [ema(kw["betas"][0], g), ema_sq(kw["betas"][1], g)]
    if pair.update is _ademamix_update:
        return [ema(kw["betas"][0], g), ema_sq(kw["betas"][1], g),
                ema(_ademamix_schedules(kw, 1)[1], g)]
    if pair.update is _lion_update:
        return [ema(kw["betas"][1], g)]
    g = g.clone().add_(p, alpha=kw["weight_decay"])
    if pair.update is _rmsprop_update:
        return [ema_sq(kw["alpha"], g)]
    if pair.update is _adagrad_update:
        return [ema_sq(0.0, g)]
    return [g]


@pytest.mark.parametrize("name", list(PAIRS))
def test_bitsandbytes_as_shipped(name):
    """bitsandbytes 0.50's own quantizer: after one step, absmax equal and every code of
    bitsandbytes the one a bin of its 65536-bin table explains (the nearest code to some
    value within 1/65535 of the exact one; fastopt's is the nearest code to the exact
    value); 10 steps: params within the tolerance the two runs' states explain."""
    pair = PAIRS[name]
    record = {}
    h = np.float64(1.01 / 65535)       # half a bin of [-1, 1] / 65535, and float32 rounding

    def first(bopt, fopt, tensors, arrays, track):
        for i, t in enumerate(tensors[:2]):                  # the int8 ones
            st = bopt.state[t]
            values = _first_values(pair, _params()[i], _grads(1)[i])
            for j, (name_, x) in enumerate(zip(_fo_columns(fopt, i), values)):
                c, absmax, code = _bnb_column(pair, st, j)
                np.testing.assert_allclose(fopt.state[i][name_ + lowbit.ABSMAX], absmax,
                                           rtol=1e-6, atol=0)
                code = code.astype(F32)
                mids = (F32(0.5) * (code[:-1] + code[1:])).astype(np.float64)
                inv = (F32(1) / absmax.astype(F32)).astype(F32)
                xn = (_numpy(x).reshape(-1) * np.repeat(inv, blockwise.BLOCK)[:x.numel()])
                xn = xn.astype(F32).astype(np.float64)
                lo, hi = np.searchsorted(mids, xn - h), np.searchsorted(mids, xn + h)
                c = c.reshape(-1)
                assert np.all((lo <= c) & (c <= hi)), (name_, int(np.sum((c < lo) | (c > hi))))
                if pair.same_maps:
                    record[(1, i, name_)] = _frac_equal(c, fopt.state[i][name_])
                # fastopt's codes: the nearest of its map to the value (ties to the lower)
                mine = fopt.state[i][name_].reshape(-1)
                table = _fo_map(fopt, name_)
                dist = np.abs(table.astype(np.float64)[mine] - xn)
                left = np.abs(table.astype(np.float64)[np.maximum(mine.astype(int) - 1, 0)] - xn)
                right = np.abs(table.astype(np.float64)[np.minimum(mine.astype(int) + 1, 255)] - xn)
                assert np.all(dist <= np.minimum(left, right) + 1e-7 * np.abs(xn))
        _check_against(pair, 1, 0.0, 1e-6, record, bins=h)(bopt, fopt, tensors, arrays, track)

    checks = {1: first, 10: _check_against(pair, 10, 0.0, None, record, bins=h)}
    bopt, _, tensors, _, _ = _run(pair, 10, checks)
    # the maps: bitsandbytes' unsigned one is fastopt's bit for bit; the signed one too
    # but for code 0, which bitsandbytes 0.50 leaves at -0.99297 (fastopt: -1.0, as
    # bitsandbytes <= 0.49's CPU quantizer set it)
    st = bopt.state[tensors[0]]
    theirs = _numpy(st["qmap1"]).astype(F32)
    assert np.array_equal(theirs[1:].view(np.uint32), SIGNED[1:].view(np.uint32))
    assert theirs[0] in (F32(-1.0), bnb_functional.create_dynamic_map(signed=True)[0].item())
    if "qmap2" in st:
        assert np.array_equal(_numpy(st["qmap2"]).view(np.uint32), UNSIGNED.view(np.uint32))
    _report(f"{pair.bnb_class} vs fo.{pair.fo_class} (as shipped)", record)


# -- loading bitsandbytes' state dicts -----------------------------------------------------------
def _as_numpy(obj):
    """A state dict with every tensor a NumPy array (nested dicts and lists kept)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_numpy(v) for v in obj)
    return obj


def _flat(sd):
    """bitsandbytes <= 0.49.1's state dict form: no FSDP wrapper around the columns."""
    out = dict(sd, state={})
    for pid, st in sd["state"].items():
        st = dict(st)
        st.update(st.pop("__bnb_optimizer_quant_state__", {}))
        out["state"][pid] = st
    return out


def _loaded(pair, trained, check_load, sizes=SIZES, flat=False):
    """``opts`` for :func:`_run`: bitsandbytes trains ``trained`` steps; a fresh fastopt
    optimizer on the params it reached loads its ``state_dict()`` (through NumPy and
    ``lowbit.from_bitsandbytes``); ``check_load(pair, bopt, fopt, tensors)`` looks at
    both."""
    def opts(arrays, tensors):
        bopt = pair.bnb(tensors)
        for step in range(1, trained + 1):
            for t, g in zip(tensors, _grads(step, sizes)):
                t.grad = torch.from_numpy(g)
            bopt.step()
        for a, t in zip(arrays, tensors):
            a[...] = _numpy(t)
        fopt = pair.fo(arrays)
        sd = _as_numpy(bopt.state_dict())
        fopt.load_state_dict(lowbit.from_bitsandbytes(_flat(sd) if flat else sd, fopt))
        check_load(pair, bopt, fopt, tensors)
        return bopt, fopt
    return opts


def _same_state(pair, bopt, fopt, tensors):
    """Right after loading, with maps equal: fastopt holds bitsandbytes' bytes (a
    stacked ``state1``'s rows in their columns)."""
    for i, t in enumerate(tensors):
        st = bopt.state[t]
        for j, name in enumerate(_fo_columns(fopt, i)):
            theirs, absmax, _ = _bnb_column(pair, st, j)
            mine = fopt.state[i][name]
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), (i, name)
            if absmax is not None:
                assert np.array_equal(fopt.state[i][name + lowbit.ABSMAX].view(np.uint32),
                                      absmax.view(np.uint32))


def _requantized(pair, bopt, fopt, tensors, record=None):
    """Right after loading codes of another map: each value bitsandbytes' codes decode
    to (with its map) is fastopt's within half of its map's largest spacing times the
    block's absmax (fastopt encodes that value; float32 state is copied as it is)."""
    for i, t in enumerate(tensors):
        st = bopt.state[t]
        for j, name in enumerate(_fo_columns(fopt, i)):
            theirs, mine = _decoded_bnb(pair, st, j), _decoded_fo(fopt, i, name)
            codes, absmax, _ = _bnb_column(pair, st, j)
            if absmax is None:
                assert np.array_equal(theirs, mine)
                continue
            half_gap = 0.5 * np.diff(_fo_map(fopt, name).astype(np.float64)).max()
            absmax = np.repeat(fopt.state[i][name + lowbit.ABSMAX], blockwise.BLOCK)
            # and float32 rounding (bitsandbytes' values can sit on fastopt's midpoints)
            bound = (half_gap + 1e-6) * absmax[:theirs.size].reshape(theirs.shape)
            assert np.all(np.abs(theirs - mine) <= bound), (i, name)
            if record is not None:
                record[(TRAINED, i, name)] = _frac_equal(codes, fopt.state[i][name])


TRAINED = 20


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("flat", [False, True], ids=["wrapped", "flat"])
def test_load_bitsandbytes_state_dict_and_continue(name, flat, nearest_code):
    """bitsandbytes trains 20 steps; fastopt loads its state dict (both forms: 0.49.2's
    with the columns under ``__bnb_optimizer_quant_state__``, and the flat one) bit for
    bit (AdEMAMix8bit's stacked ``state1`` into exp_avg and exp_avg_slow), or for
    RMSprop8bit and Adagrad8bit (signed map) decoded and encoded with fastopt's map;
    10 more steps side by side: codes >= 99.9% equal (decoded states within the bound
    above :func:`_check_decoded`), params within the tolerance."""
    pair = PAIRS[name]
    record = {}
    last = TRAINED + 10
    checks = {s: _check_against(pair, s, 0.999, 1e-6, record) for s in (TRAINED + 1, last)}
    loaded = _same_state if pair.same_maps else _requantized
    _run(pair, 10, checks, opts=_loaded(pair, TRAINED, loaded, flat=flat),
         start=TRAINED + 1)
    if not flat:
        _report(f"{pair.bnb_class} -> fo.{pair.fo_class}, loaded after {TRAINED} steps "
                "(nearest-code quantizer)", record)


def test_load_bitsandbytes_as_shipped_state_dict():
    """bitsandbytes 0.50's own state dict: its signed map (code 0 = -0.99297) is not
    fastopt's, so the codes are decoded with it and encoded with fastopt's: each value
    within half of fastopt's largest map spacing of the block's absmax; then 10 steps
    side by side, params within the tolerance the states explain."""
    pair = PAIRS["AdamW"]
    record = {}

    def requantized(pair, bopt, fopt, tensors):
        _requantized(pair, bopt, fopt, tensors, record)

    checks = {TRAINED + 10: _check_against(pair, TRAINED + 10, 0.0, None, record)}
    _run(pair, 10, checks, opts=_loaded(pair, TRAINED, requantized), start=TRAINED + 1)
    _report("AdamW8bit -> fo.AdamW, loaded after 20 steps (as shipped)", record)


def test_load_bitsandbytes_float32_state_dict():
    """Tensors under min_8bit_size: bitsandbytes keeps float32 ``state1``/``state2`` (no
    absmax, no map); fastopt loads them as they are (its int8 optimizer keeps float32
    state there too) and both go on together."""
    pair = PAIRS["Adam"]
    sizes = [(300,), (50, 60)]

    def same(pair, bopt, fopt, tensors):
        _same_state(pair, bopt, fopt, tensors)
        assert all(bopt.state[t]["state1"].dtype == torch.float32 for t in tensors)

    checks = {TRAINED + 10: _check_against(pair, TRAINED + 10, 1.0, 0.0, {})}
    _run(pair, 10, checks, opts=_loaded(pair, TRAINED, same, sizes=sizes),
         start=TRAINED + 1, sizes=sizes)


def test_from_bitsandbytes_refuses_non_blockwise_state():
    """``block_wise=False`` state (one max per tensor: ``max1``/``new_max1``) is not
    fastopt's scheme: a clear error, not a silent misload."""
    arrays = _params()
    fopt = fo.Adam(arrays, state_format="int8")
    sd = {"state": {0: {"step": 1, "state1": np.zeros(SIZES[0], np.uint8),
                        "max1": np.ones(1, F32), "new_max1": np.ones(1, F32)}},
          "param_groups": [{"lr": 1e-3, "params": [0, 1, 2]}]}
    with pytest.raises(ValueError, match="non-blockwise"):
        lowbit.from_bitsandbytes(sd, fopt)


def _bnb_state_dict(pair, steps=1, **changed):
    """bitsandbytes' state dict (NumPy) after ``steps`` steps of ``pair`` (its keywords
    ``changed``), with the params it reached."""
    arrays = _params()
    tensors = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    bopt = getattr(bnb.optim, pair.bnb_class)(tensors, **{**pair.kw, **pair.bnb_kw, **changed})
    for step in range(1, steps + 1):
        for t, g in zip(tensors, _grads(step)):
            t.grad = torch.from_numpy(g)
        bopt.step()
    return _as_numpy(bopt.state_dict()), [_numpy(t).copy() for t in tensors]


def test_from_bitsandbytes_takes_the_hyperparameters_bitsandbytes_implies():
    """Loaded into fastopt optimizers made with their defaults: AdEMAMix8bit's three
    betas, alpha, its two warm-ups as t_alpha_beta3 and its decoupled decay;
    RMSprop8bit's alpha (bitsandbytes' betas[0]); SGD8bit's momentum (the same)."""
    cases = [("AdEMAMix", dict(betas=(0.8, 0.99, 0.995), alpha=3.0, t_alpha=7, t_beta3=7),
              dict(betas=(0.8, 0.99, 0.995), alpha=3.0, t_alpha_beta3=7,
                   weight_decouple=True, fixed_decay=False)),
             ("RMSprop", dict(alpha=0.9), dict(alpha=0.9)),
             ("SGD", dict(momentum=0.8), dict(momentum=0.8))]
    for name, changed, expected in cases:
        pair = PAIRS[name]
        sd, params = _bnb_state_dict(pair, **changed)
        fopt = getattr(fo, pair.fo_class)(params, state_format="int8")
        fopt.load_state_dict(lowbit.from_bitsandbytes(sd, fopt))
        group = fopt.param_groups[0]
        assert {k: group[k] for k in expected} == expected, name
        assert group["lr"] == pair.kw["lr"]


def test_from_bitsandbytes_refuses_unequal_ademamix_warmups():
    pair = PAIRS["AdEMAMix"]
    sd, params = _bnb_state_dict(pair, t_alpha=10, t_beta3=20)
    fopt = pair.fo(params)
    with pytest.raises(ValueError, match=r"t_alpha=10 and t_beta3=20"):
        lowbit.from_bitsandbytes(sd, fopt)


@pytest.mark.parametrize("key, bad", [
    ("state1", lambda v: v[0]),                               # not stacked: the param's shape
    ("state1", lambda v: np.concatenate([v, v[:1]])),         # three rows
    ("absmax1", lambda v: v[0]),                              # one row of block maxima
])
def test_from_bitsandbytes_refuses_a_badly_stacked_ademamix_state(key, bad):
    """AdEMAMix8bit's ``state1`` must be ``(2, *p.shape)`` and ``absmax1`` two rows: other
    shapes raise an error naming the key."""
    pair = PAIRS["AdEMAMix"]
    sd, params = _bnb_state_dict(pair)
    sd = _flat(sd)
    sd["state"][0][key] = bad(sd["state"][0][key])
    fopt = pair.fo(params)
    with pytest.raises(ValueError, match=rf"\['{key}'\] has shape"):
        lowbit.from_bitsandbytes(sd, fopt)

