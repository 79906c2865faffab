"""The NumPy reference: every optimizer step written from the published equations.

This module is the test oracle and the benchmark baseline, and it is the ``"numpy"``
backend. It is written separately from the element functions (whole-array NumPy, one
tensor at a time, in place) so a bug in one is not silently shared by the other. The
equations are torch.optim's (torch 2.13 documentation), whose defaults and state names
fastopt follows. Arrays are updated in place; Python float hyperparameters combine with
float32 arrays in float32 (NumPy 2 promotion rules).
"""
from __future__ import annotations

import math

import numpy as np


def _l2(grad, param, weight_decay, maximize):
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    return g


def _decay(grad, param, lr, weight_decay, decoupled, maximize):
    """torch's weight decay for the Adam family: decoupled (``p *= 1 - lr wd``, in place)
    or L2 (added to the gradient); returns the gradient the step uses."""
    if decoupled:
        param *= 1 - lr * weight_decay
        return _l2(grad, param, 0.0, maximize)
    return _l2(grad, param, weight_decay, maximize)


def sgd(params, grads, momentum_buffers, *, first_step, lr, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False):
    """torch.optim.SGD. ``momentum_buffers[i]`` is updated in place (ignored if momentum == 0);
    ``first_step[i]`` says that buffer ``i`` holds nothing yet."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d_p = _l2(g, p, weight_decay, maximize)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step[i]:
                buf[...] = d_p
            else:
                buf *= momentum
                buf += (1 - dampening) * d_p
            d_p = d_p + momentum * buf if nesterov else buf
        p -= lr * d_p


def adagrad(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """torch.optim.Adagrad; ``step`` is the 1-based step count after this update."""
    clr = lr / (1 + (step - 1) * lr_decay)
    for p, g, acc in zip(params, grads, state_sums):
        d_p = _l2(g, p, weight_decay, maximize)
        acc += d_p * d_p
        p -= clr * (d_p / (np.sqrt(acc) + eps))


def rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, *, lr=1e-2, alpha=0.99,
            eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    """torch.optim.RMSprop."""
    for i, (p, g, sq) in enumerate(zip(params, grads, square_avgs)):
        d_p = _l2(g, p, weight_decay, maximize)
        sq *= alpha
        sq += (1 - alpha) * d_p * d_p
        if centered:
            ga = grad_avgs[i]
            ga += (1 - alpha) * (d_p - ga)
            avg = np.sqrt(sq - ga * ga) + eps
        else:
            avg = np.sqrt(sq) + eps
        if momentum > 0:
            buf = momentum_buffers[i]
            buf *= momentum
            buf += d_p / avg
            p -= lr * buf
        else:
            p -= lr * (d_p / avg)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
         beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """torch.optim.Adam (and AdamW with ``decoupled_weight_decay=True``)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        d_p = _decay(g, p, lr, weight_decay, decoupled_weight_decay, maximize)
        m += (1 - beta1) * (d_p - m)
        v *= beta2
        v += (1 - beta2) * d_p * d_p
        if amsgrad:
            np.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        else:
            second = v
        denom = np.sqrt(second) / math.sqrt(bc2) + eps
        p -= (lr / bc1) * (m / denom)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False):
    """torch.optim.AdamW: Adam with weight decay applied to the parameter, not the gradient."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=True)


def sparse_adam(param, indices, rows, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, maximize=False):
    """torch.optim.SparseAdam on unique row ``indices`` with gradient ``rows``: only those
    rows of the moments and the param change."""
    g = -rows if maximize else rows
    m = exp_avg[indices]
    v = exp_avg_sq[indices]
    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    exp_avg[indices] = m
    exp_avg_sq[indices] = v
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    param[indices] -= step_size * (m / (np.sqrt(v) + eps))


def roof(params, grads, states):
    """The roof's access pattern in NumPy: read p, g, states; write p, states (trivial math)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        p += g
        for s in states:
            s[i] += g


# ---------------------------------------------------------------------------------------
# The rest of the family: torch.optim's Adamax, NAdam, RAdam and Adadelta (torch 2.13
# documentation), optax's Lion, LAMB and LARS (optax documentation and papers), and
# Keras 3's optimizers (keras.optimizers documentation and update rules).


def _lerp_(m, g, weight):
    """torch.lerp_(m, g, weight) in place, in both of torch's forms: ``m + w (g - m)`` for
    ``w < 0.5``, else ``g - (g - m)(1 - w)`` (they differ for infinite g: inf vs NaN)."""
    if weight < 0.5:
        m += weight * (g - m)
    else:
        w = m.dtype.type(weight)
        m[...] = g - (g - m) * (1 - w)


def adamax(params, grads, exp_avgs, exp_infs, *, step, lr=2e-3, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=0.0, maximize=False):
    """torch.optim.Adamax: ``u = max(beta2 u, |g| + eps)``, ``p -= lr/(1-beta1^t) m/u``."""
    clr = lr / (1 - beta1 ** step)
    for p, g, m, u in zip(params, grads, exp_avgs, exp_infs):
        d_p = _l2(g, p, weight_decay, maximize)
        _lerp_(m, d_p, 1 - beta1)
        u *= beta2
        np.maximum(u, np.abs(d_p) + eps, out=u)                # NaN on either side propagates
        p -= clr * (m / u)


def nadam_mu(step, beta1, momentum_decay):
    """NAdam's momentum schedule ``mu_t = beta1 (1 - 0.5 * 0.96^(t psi))``."""
    return beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))


def nadam(params, grads, exp_avgs, exp_avg_sqs, *, step, mu_product, lr=2e-3, beta1=0.9,
          beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
          decoupled_weight_decay=False, maximize=False):
    """torch.optim.NAdam; ``mu_product`` is ``mu_1 ... mu_t`` (this step's ``mu_t`` included)."""
    mu = nadam_mu(step, beta1, momentum_decay)
    mu_next = nadam_mu(step + 1, beta1, momentum_decay)
    bc2 = 1 - beta2 ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        d_p = _decay(g, p, lr, weight_decay, decoupled_weight_decay, maximize)
        _lerp_(m, d_p, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * d_p * d_p
        denom = np.sqrt(v / bc2) + eps
        p += (-lr * (1 - mu) / (1 - mu_product)) * (d_p / denom)
        p += (-lr * mu_next / (1 - mu_product * mu_next)) * (m / denom)


def radam(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """torch.optim.RAdam: the rectified step when ``rho_t > 5``, else the un-adapted one."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / bc2
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        d_p = _decay(g, p, lr, weight_decay, decoupled_weight_decay, maximize)
        _lerp_(m, d_p, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * d_p * d_p
        m_hat = m / bc1
        if rho_t > 5:
            r = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            p -= m_hat * lr * (math.sqrt(bc2) / (np.sqrt(v) + eps)) * r
        else:
            p -= m_hat * lr


def adadelta(params, grads, square_avgs, acc_deltas, *, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False):
    """torch.optim.Adadelta."""
    for p, g, sq, acc in zip(params, grads, square_avgs, acc_deltas):
        d_p = _l2(g, p, weight_decay, maximize)
        sq *= rho
        sq += (1 - rho) * d_p * d_p
        delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * d_p
        acc *= rho
        acc += (1 - rho) * delta * delta
        p -= lr * delta


def lion(params, grads, exp_avgs, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=1e-3,
         maximize=False):
    """optax.lion: ``p -= lr (sign((1-b1) g + b1 m) + wd p)``, ``m = (1-b2) g + b2 m``."""
    for p, g, m in zip(params, grads, exp_avgs):
        d_p = -g if maximize else g
        update = np.sign((1 - beta1) * d_p + beta1 * m)
        if weight_decay != 0:
            update = update + weight_decay * p
        p -= lr * update
        m *= beta2
        m += (1 - beta2) * d_p


def _norm64(a):
    """The 2-norm accumulated in float64 (fastopt's per-tensor reductions do the same)."""
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


def trust_ratio(param, update, trust_coefficient=1.0, eps=0.0):
    """optax.scale_by_trust_ratio's factor for one tensor (1 where a norm is zero)."""
    p_norm, u_norm = _norm64(param), _norm64(update)
    if p_norm == 0 or u_norm == 0:
        return 1.0
    return trust_coefficient * p_norm / (u_norm + eps)


def lamb(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
         eps=1e-6, eps_root=0.0, weight_decay=0.0):
    """optax.lamb: Adam's direction plus ``wd p``, scaled per tensor by ``||p|| / ||u||``."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        u = (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step) + eps_root) + eps)
        if weight_decay != 0:
            u = u + weight_decay * p
        ratio = trust_ratio(p, u)
        p -= lr * (u * p.dtype.type(ratio))


def lars(params, grads, traces, *, lr=1.0, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0,
         momentum=0.9, nesterov=False):
    """optax.lars: ``u = g + wd p`` scaled per tensor by ``tc ||p|| / (||u|| + eps)``, times
    ``-lr``, then optax's trace (momentum) of that step."""
    for p, g, t in zip(params, grads, traces):
        u = g + weight_decay * p if weight_decay != 0 else g
        s = -lr * (u * p.dtype.type(trust_ratio(p, u, trust_coefficient, eps)))
        t *= momentum
        t += s
        p += s + momentum * t if nesterov else t


def keras_clip(grads, *, clipnorm=None, clipvalue=None, global_clipnorm=None):
    """Keras's gradient clipping (at most one option set; None or 0 is off); new arrays."""
    if clipnorm:
        out = []
        for g in grads:
            norm = _norm64(g)
            out.append(g * g.dtype.type(clipnorm / max(norm, clipnorm)))
        return out
    if global_clipnorm:
        norm = np.sqrt(sum(_norm64(g) ** 2 for g in grads))
        with np.errstate(divide="ignore"):
            scale = global_clipnorm * min(1.0 / norm, 1.0 / global_clipnorm) + (norm - norm)
        return [g * g.dtype.type(scale) for g in grads]
    if clipvalue:
        return [np.clip(g, -clipvalue, clipvalue) for g in grads]
    return [g.copy() for g in grads]


def _keras_decay(p, lr, weight_decay):
    if weight_decay:
        p -= p * weight_decay * lr


def keras_sgd(params, grads, momentums, *, lr=0.01, momentum=0.0, nesterov=False,
              weight_decay=None):
    """keras.optimizers.SGD: ``v = momentum v - lr g``, ``w += v`` (Nesterov:
    ``w += momentum v - lr g``); weight decay ``w -= w wd lr`` first."""
    for i, (p, g) in enumerate(zip(params, grads)):
        _keras_decay(p, lr, weight_decay)
        if momentum != 0:
            v = momentums[i]
            v *= momentum
            v -= lr * g
            p += momentum * v - lr * g if nesterov else v
        else:
            p -= lr * g


def keras_rmsprop(params, grads, velocities, momentums, average_gradients, *, lr=1e-3,
                  rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None):
    """keras.optimizers.RMSprop: eps inside the square root, lr inside the momentum."""
    for i, (p, g, vel) in enumerate(zip(params, grads, velocities)):
        _keras_decay(p, lr, weight_decay)
        vel *= rho
        vel += (1 - rho) * g * g
        if centered:
            avg = average_gradients[i]
            avg *= rho
            avg += (1 - rho) * g
            increment = lr * g / np.sqrt(vel - avg * avg + epsilon)
        else:
            increment = lr * g / np.sqrt(vel + epsilon)
        if momentum > 0:
            mom = momentums[i]
            mom *= momentum
            mom += increment
            p -= mom
        else:
            p -= increment


def keras_adagrad(params, grads, accumulators, *, lr=1e-3, epsilon=1e-7, weight_decay=None):
    """keras.optimizers.Adagrad (accumulators start at initial_accumulator_value, 0.1)."""
    for p, g, acc in zip(params, grads, accumulators):
        _keras_decay(p, lr, weight_decay)
        acc += g * g
        p -= lr * g / np.sqrt(acc + epsilon)


def keras_adam(params, grads, momentums, velocities, velocity_hats=None, *, step, lr=1e-3,
               beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=None):
    """keras.optimizers.Adam / AdamW: "epsilon hat" placement,
    ``w -= m lr sqrt(1-b2^t)/(1-b1^t) / (sqrt(v) + eps)``."""
    alpha = lr * np.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
    for i, (p, g, m, v) in enumerate(zip(params, grads, momentums, velocities)):
        _keras_decay(p, lr, weight_decay)
        m += (g - m) * (1 - beta_1)
        v += (g * g - v) * (1 - beta_2)
        second = v
        if amsgrad:
            np.maximum(velocity_hats[i], v, out=velocity_hats[i])
            second = velocity_hats[i]
        p -= m * alpha / (np.sqrt(second) + epsilon)


def keras_adamax(params, grads, momentums, norms, *, step, lr=1e-3, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, weight_decay=None):
    """keras.optimizers.Adamax: ``w -= lr m / ((1 - b1^t)(u + eps))``, ``u = max(b2 u, |g|)``."""
    for p, g, m, u in zip(params, grads, momentums, norms):
        _keras_decay(p, lr, weight_decay)
        m += (g - m) * (1 - beta_1)
        np.maximum(beta_2 * u, np.abs(g), out=u)
        p -= lr * m / ((1 - beta_1 ** step) * (u + epsilon))


def keras_nadam_u(step, beta_1):
    """Keras Nadam's ``u_t = b1 (1 - 0.5 * 0.96^t)``."""
    return beta_1 * (1 - 0.5 * 0.96 ** step)


def keras_nadam(params, grads, momentums, velocities, *, step, u_product, lr=1e-3, beta_1=0.9,
                beta_2=0.999, epsilon=1e-7, weight_decay=None):
    """keras.optimizers.Nadam; ``u_product`` is ``u_1 ... u_t`` (this step's included)."""
    u_t = keras_nadam_u(step, beta_1)
    u_next = keras_nadam_u(step + 1, beta_1)
    for p, g, m, v in zip(params, grads, momentums, velocities):
        _keras_decay(p, lr, weight_decay)
        m += (g - m) * (1 - beta_1)
        v += (g * g - v) * (1 - beta_2)
        m_hat = u_next * m / (1 - u_product * u_next) + (1 - u_t) * g / (1 - u_product)
        v_hat = v / (1 - beta_2 ** step)
        p -= m_hat * lr / (np.sqrt(v_hat) + epsilon)


def keras_adadelta(params, grads, accumulated_grads, accumulated_deltas, *, lr=1e-3, rho=0.95,
                   epsilon=1e-7, weight_decay=None):
    """keras.optimizers.Adadelta: ``delta = -sqrt(a + eps) g / sqrt(s + eps)``, ``w += lr delta``."""
    for p, g, s, a in zip(params, grads, accumulated_grads, accumulated_deltas):
        _keras_decay(p, lr, weight_decay)
        s *= rho
        s += (1 - rho) * g * g
        delta = -(np.sqrt(a + epsilon) * g / np.sqrt(s + epsilon))
        a *= rho
        a += (1 - rho) * delta * delta
        p += lr * delta


def adan(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, previous_grads, *, step, lr=1e-3,
         beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0, weight_decouple=False,
         maximize=False):
    """Adan (Xie et al., arXiv:2208.06677, TPAMI 2024) as pytorch_optimizer.Adan 4.1.0.

    ``previous_grads[i]`` holds the previous gradient negated (the oracle's
    ``previous_grad``); on ``step == 1`` its content is ignored and the gradient
    difference is zero. ``weight_decouple``: ``p *= 1 - lr wd`` before the update, else
    ``p /= 1 + lr wd`` after it. ``maximize`` negates the gradient before anything else.
    """
    # Python floats: a NumPy float64 hyperparameter would promote float32 arrays.
    lr, beta1, beta2, beta3 = float(lr), float(beta1), float(beta2), float(beta3)
    eps, weight_decay = float(eps), float(weight_decay)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    bc3_sqrt = math.sqrt(1 - beta3 ** step)
    for p, g, m, n, v, prev in zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs,
                                   previous_grads):
        d_p = -g if maximize else g
        if step == 1:
            np.negative(d_p, out=prev)
        prev += d_p                              # now g_t - g_{t-1}
        _lerp_(m, d_p, 1 - beta1)
        _lerp_(v, prev, 1 - beta2)
        u = prev * beta2 + d_p
        n *= beta3
        n += (1 - beta3) * u * u
        denom = np.sqrt(n) / bc3_sqrt + eps
        if weight_decay != 0 and weight_decouple:
            p *= 1 - lr * weight_decay
        p += (-lr / bc1) * m / denom
        p += (-lr * beta2 / bc2) * v / denom
        if weight_decay != 0 and not weight_decouple:
            p /= 1 + lr * weight_decay
        np.negative(d_p, out=prev)
