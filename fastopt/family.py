"""The rest of the optimizer family: torch's Adamax, NAdam, RAdam, Adadelta; optax's Lion,
LAMB and LARS.

Each class maps a param group to its element function's state slots and host scalars,
and to its NumPy reference; the base class does the rest. NAdam keeps torch's per-tensor
``mu_product`` on the host; LAMB and LARS run two passes per step (per-tensor norms,
then the update scaled by each tensor's trust ratio) on the CPU or CUDA driver.
"""
from __future__ import annotations

import math

import numpy as np

from . import _backend
from . import _validate as v
from .kernels import adadelta as _adadelta
from .kernels import adamax as _adamax
from .kernels import lamb as _lamb
from .kernels import lars as _lars
from .kernels import lion as _lion
from .kernels import nadam as _nadam
from .kernels import radam as _radam
from .kernels import reference
from .optim import _lr_wd_eps
from .optimizer import Optimizer, _Bucket

__all__ = ["Adamax", "NAdam", "RAdam", "Adadelta", "Lion", "LAMB", "LARS"]

# The group key under which NAdam hands a bucket's mu_product to _scalars/_reference (in a
# copy of the group made for that call only; never stored in param_groups).
_MU_PRODUCT = "_mu_product"


def _scaled(grads, scale):
    return grads if scale == 1.0 else [g * g.dtype.type(scale) for g in grads]


class Adamax(Optimizer):
    """Adamax: Adam with the infinity norm.

    References:
      Kingma & Ba, ICLR 2015 (section 7.1); torch.optim.Adamax.
    State: ``exp_avg``, ``exp_inf``, ``step``.
    """

    element = staticmethod(_adamax.adamax_element)
    slot_names = ("exp_avg", "exp_inf")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, backend=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        group["betas"] = v.betas(group["betas"], where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", "exp_inf", None)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _adamax.adamax_scalars(step, group["lr"], beta1, beta2, group["eps"],
                                      group["weight_decay"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.adamax(params, grads, slots[0], slots[1], step=step, lr=group["lr"], beta1=beta1,
                         beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"])


class NAdam(Optimizer):
    """NAdam: Adam with Nesterov momentum and torch's momentum schedule.

    References:
      Dozat, ICLR 2016 workshop; torch.optim.NAdam (``momentum_decay``,
      ``decoupled_weight_decay``).
    State: ``exp_avg``, ``exp_avg_sq``, ``step``, ``mu_product`` (a float32 scalar per
    parameter, the running product of the momentum schedule, as torch keeps it).
    """

    element = staticmethod(_nadam.nadam_element)
    slot_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False,
                 backend=None, **options):
        self._mu_product = np.ones(0, dtype=np.float32)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize), backend, **options)

    def add_param_group(self, group):
        before = len(self._steps)
        super().add_param_group(group)
        fresh = np.ones(len(self._steps) - before, dtype=np.float32)
        self._mu_product = np.concatenate([self._mu_product, fresh])

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        group["betas"] = v.betas(group["betas"], where)
        v.number("momentum_decay", group["momentum_decay"], low=0.0, where=where)
        v.flag("decoupled_weight_decay", group["decoupled_weight_decay"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", "exp_avg_sq", None)

    @staticmethod
    def _mu_product_of(group, step):
        """The bucket's mu_product (this step's mu_t included): passed by ``_run_bucket``
        in a copy of the group; for a fresh parameter (functional use) the product of the
        schedule over steps 1..step at the group's betas, rounded as torch rounds it."""
        value = group.get(_MU_PRODUCT)
        if value is None:
            value = np.float32(1.0)
            for s in range(1, step + 1):
                value = _nadam.next_mu_product(value, s, group["betas"][0], group["momentum_decay"])
        return float(value)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _nadam.nadam_scalars(step, cls._mu_product_of(group, step), group["lr"], beta1, beta2,
                                    group["eps"], group["weight_decay"], group["momentum_decay"],
                                    group["decoupled_weight_decay"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.nadam(params, grads, slots[0], slots[1], step=step,
                        mu_product=cls._mu_product_of(group, step), lr=group["lr"], beta1=beta1,
                        beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        momentum_decay=group["momentum_decay"],
                        decoupled_weight_decay=group["decoupled_weight_decay"],
                        maximize=group["maximize"])

    def _run_bucket(self, group, bucket, step, backend_name, scale=1.0):
        new = _nadam.next_mu_product(self._mu_product[bucket.indices], step, group["betas"][0],
                                     group["momentum_decay"])
        values = np.unique(new)
        for value in values:
            sub = bucket
            if values.size > 1:   # tensors whose products differ (loaded that way): one pass each
                sel = np.flatnonzero(new == value)
                sub = _Bucket(bucket.indices[sel], [bucket.params[j] for j in sel],
                              [bucket.grads[j] for j in sel],
                              tuple(None if s is None else [s[j] for j in sel] for s in bucket.slots))
                if getattr(bucket, "model", None) is not None:
                    sub.model = [bucket.model[j] for j in sel]
            super()._run_bucket({**group, _MU_PRODUCT: float(value)}, sub, step, backend_name, scale)
        self._mu_product[bucket.indices] = new

    def _state_of(self, i):
        d = super()._state_of(i)
        if d is not None:
            d["mu_product"] = np.float32(self._mu_product[i])
        return d

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for i, d in sd["state"].items():
            d["mu_product"] = np.array(self._mu_product[i], dtype=np.float32)
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load torch's or fastopt's NAdam state dict (``mu_product`` restored per parameter).

        A state without ``mu_product`` (from elsewhere) gets the product of the schedule
        over its steps at the loaded hyperparameters.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            super().load_state_dict(state_dict)      # raises the base class's message
            return
        stripped, products = {}, {}
        for pid, st in state_dict["state"].items():
            st = dict(st)
            if "mu_product" in st:
                value = np.asarray(st.pop("mu_product"))
                where = f"state_dict['state'][{pid!r}]['mu_product']"
                if value.size != 1 or value.dtype.kind not in "fiu":
                    raise ValueError(f"{where} must be a scalar, got {value!r}")
                f = float(value.reshape(()))
                if not (math.isfinite(f) and 0.0 <= f <= 1.0):
                    raise ValueError(f"{where} must be in [0, 1], got {f}")
                products[pid] = f
            stripped[pid] = st
        super().load_state_dict({**state_dict, "state": stripped})
        self._mu_product = np.ones(len(self._steps), dtype=np.float32)
        base = 0
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            beta1, md = group["betas"][0], group["momentum_decay"]
            for k, pid in enumerate(saved["params"]):
                i = base + k
                if pid in products:
                    self._mu_product[i] = np.float32(products[pid])
                else:
                    prod = np.float32(1.0)
                    for s in range(1, int(self._steps[i]) + 1):
                        prod = _nadam.next_mu_product(prod, s, beta1, md)
                    self._mu_product[i] = prod
            base += len(group["params"])


class RAdam(Optimizer):
    """RAdam: Adam with a rectified adaptive learning rate (torch's threshold rho_t > 5).

    References:
      Liu et al., ICLR 2020; torch.optim.RAdam (``decoupled_weight_decay``).
    State: ``exp_avg``, ``exp_avg_sq``, ``step``.
    """

    element = staticmethod(_radam.radam_element)
    slot_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, backend=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        group["betas"] = v.betas(group["betas"], where)
        v.flag("decoupled_weight_decay", group["decoupled_weight_decay"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", "exp_avg_sq", None)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _radam.radam_scalars(step, group["lr"], beta1, beta2, group["eps"],
                                    group["weight_decay"], group["decoupled_weight_decay"],
                                    group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.radam(params, grads, slots[0], slots[1], step=step, lr=group["lr"], beta1=beta1,
                        beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        decoupled_weight_decay=group["decoupled_weight_decay"],
                        maximize=group["maximize"])


class Adadelta(Optimizer):
    """Adadelta.

    References:
      Zeiler, arXiv:1212.5701 (2012); torch.optim.Adadelta.
    State: ``square_avg``, ``acc_delta``, ``step``.
    """

    element = staticmethod(_adadelta.adadelta_element)
    slot_names = ("square_avg", "acc_delta")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False,
                 backend=None, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        v.number("rho", group["rho"], low=0.0, high=1.0, where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("square_avg", "acc_delta", None)

    @classmethod
    def _scalars(cls, group, step, cast):
        return _adadelta.adadelta_scalars(group["lr"], group["rho"], group["eps"],
                                          group["weight_decay"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        reference.adadelta(params, grads, slots[0], slots[1], lr=group["lr"], rho=group["rho"],
                           eps=group["eps"], weight_decay=group["weight_decay"],
                           maximize=group["maximize"])


class Lion(Optimizer):
    """Lion (EvoLved Sign Momentum), with optax's equations and defaults.

    References:
      Chen et al., NeurIPS 2023; optax.lion.
    Names: ``lr`` is optax's ``learning_rate`` (optax has no default; 1e-4 here, 3-10x
    below a typical AdamW lr as the paper advises), ``betas = (b1, b2) = (0.9, 0.99)``,
    ``weight_decay = 1e-3`` as optax (decoupled: ``p -= lr (sign(c) + wd p)``).
    State: ``exp_avg`` (optax's ``mu``).
    """

    element = staticmethod(_lion.lion_element)
    slot_names = ("exp_avg",)
    has_step_state = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-3, *, maximize=False,
                 backend=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where, eps=False)
        group["betas"] = v.betas(group["betas"], where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", None, None)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _lion.lion_scalars(group["lr"], beta1, beta2, group["weight_decay"],
                                  group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.lion(params, grads, slots[0], lr=group["lr"], beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"], maximize=group["maximize"])


class _TrustRatio(Optimizer):
    """Two passes per step: per-tensor norms, then the update scaled by each tensor's ratio.

    The "cpu" and "cuda" backends run both on one ``merge=False`` table (one row per
    tensor; kernels/per_tensor.py): one reduction and one step per dtype group. The
    "numpy" backend runs the reference.
    """

    norms = None   # the reducer element (p, g, s0, s1, s2, h) -> (p^2, u^2[, p, s0, s1, s2])
    norm_writes = None   # what the reducer also stores: (p, s0, s1, s2), or None (nothing)
    step_writes = None   # which state slots the step stores, or None (all present ones)

    def __init__(self, params, defaults, backend=None, **options):
        if options.get("master_weights"):
            raise NotImplementedError(f"{type(self).__name__} does not support master_weights "
                                      "(16-bit params) yet: its per-tensor pass has no 16-bit driver")
        super().__init__(params, defaults, backend, **options)

    def _trust_ratios(self, group, sums):
        raise NotImplementedError

    def _run_bucket(self, group, bucket, step, backend_name, scale=1.0):
        if backend_name == "numpy":
            self._reference(group, step, bucket.params, _scaled(bucket.grads, scale), bucket.slots)
            return
        from .kernels import per_tensor
        be = _backend.get(backend_name)
        if bucket.table is None:
            bucket.table = per_tensor.table(bucket.params, bucket.grads, bucket.slots, be)
        cast = np.dtype(bucket.params[0].dtype).type
        # The reducer reads raw gradients: it applies the step's gradient scale itself.
        scalars = self._scalars(group, step, cast)._replace(grad_scale=cast(scale))
        sums = per_tensor.row_sums(type(self).norms, bucket.table, scalars, be, self.norm_writes)
        ratios = self._trust_ratios(group, sums)
        per_tensor.run(self.element, bucket.table, scalars, ratios, mode="slot2", grad_scale=scale,
                       backend=be, writes=self.step_writes)


class LAMB(_TrustRatio):
    """LAMB: Adam's direction (plus decoupled weight decay) times ||p|| / ||update||.

    References:
      You et al., ICLR 2020; optax.lamb.
    Names: ``lr`` is optax's ``learning_rate`` (no default in optax; 1e-3 here),
    ``betas = (b1, b2)``; ``eps = 1e-6``, ``eps_root = 0``, ``weight_decay = 0`` as optax.
    The trust ratio is 1 for a tensor whose param or update norm is 0 (optax).
    State: ``exp_avg``, ``exp_avg_sq`` (optax's ``mu``, ``nu``), ``step``.
    """

    element = staticmethod(_lamb.lamb_element)
    norms = staticmethod(_lamb.lamb_moments)        # pass 1 writes the moments
    norm_writes = _lamb.MOMENTS_WRITES
    step_writes = _lamb.STEP_WRITES
    slot_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 eps_root=0.0, backend=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      eps_root=eps_root), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where, maximize=False)
        v.number("eps_root", group["eps_root"], low=0.0, where=where)
        group["betas"] = v.betas(group["betas"], where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", "exp_avg_sq", None)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _lamb.lamb_scalars(step, group["lr"], beta1, beta2, group["eps"], group["eps_root"],
                                  group["weight_decay"], cast)

    def _trust_ratios(self, group, sums):
        return _lamb.trust_ratios(sums[:, 0], sums[:, 1])

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.lamb(params, grads, slots[0], slots[1], step=step, lr=group["lr"], beta1=beta1,
                       beta2=beta2, eps=group["eps"], eps_root=group["eps_root"],
                       weight_decay=group["weight_decay"])


class LARS(_TrustRatio):
    """LARS: momentum SGD whose step is scaled per tensor by tc ||p|| / (||g + wd p|| + eps).

    References:
      You, Gitman & Ginsburg, arXiv:1708.03888 (2017); optax.lars.
    Names: ``lr`` is optax's ``learning_rate`` (no default in optax; 1.0 here, as with a
    trust coefficient of 1e-3 the effective step is ``1e-3 lr ||p|| / ||u||``);
    ``momentum = 0.9``, ``nesterov = False``, ``trust_coefficient = 1e-3``, ``eps = 0``,
    ``weight_decay = 0`` as optax. Optax's masks are param groups here: give biases and
    norms their own group with ``weight_decay=0``.
    State: ``trace`` (optax's trace, which holds ``-lr`` times the scaled update).
    """

    element = staticmethod(_lars.lars_element)
    norms = staticmethod(_lars.lars_norms)
    slot_names = ("trace",)
    has_step_state = False

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
                 eps=0.0, nesterov=False, *, backend=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps,
                                      nesterov=nesterov), backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where, maximize=False)
        v.number("momentum", group["momentum"], low=0.0, where=where)
        v.number("trust_coefficient", group["trust_coefficient"], low=0.0, where=where)
        v.flag("nesterov", group["nesterov"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("trace", None, None)

    @classmethod
    def _scalars(cls, group, step, cast):
        return _lars.lars_scalars(group["lr"], group["momentum"], group["weight_decay"],
                                  group["nesterov"], cast)

    def _trust_ratios(self, group, sums):
        return _lamb.trust_ratios(sums[:, 0], sums[:, 1], group["trust_coefficient"], group["eps"])

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        reference.lars(params, grads, slots[0], lr=group["lr"], weight_decay=group["weight_decay"],
                       trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                       momentum=group["momentum"], nesterov=group["nesterov"])
