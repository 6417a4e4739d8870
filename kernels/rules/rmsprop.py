"""RMSprop (Hinton's lecture 6e), optionally centered and with momentum, as
torch.optim.RMSprop computes it."""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_non_negative, grad_factor, in_dtype
from ..specs import SIGNED, UNSIGNED, KernelSpec
from .common import descent_direction, lerp


class Coefficients(NamedTuple):
    """`update`'s coefficients."""

    alpha: float
    alpha_complement: float  # 1 − α
    eps: float
    grad_factor: float
    weight_decay: float
    momentum: float
    neg_lr: float


@register_jitable
def update(
    param,
    grad,
    square_avg,
    momentum_buffer,
    grad_avg,
    alpha,
    alpha_complement,
    eps,
    grad_factor,
    weight_decay,
    momentum,
    neg_lr,
    has_momentum,
    centered,
):
    """RMSprop for one element, torch's for-loop arithmetic::

        g ← ±g + λ·p
        s ← α·s + (1 − α)·g²
        ḡ ← lerp(ḡ, g, 1 − α)                 (centered)
        a = √(s − ḡ²) + ε   if centered,   else   √s + ε
        b ← μ·b + g/a;  p ← p − lr·b        (momentum μ > 0)
        p ← p − lr·g/a                      (otherwise)

    ``momentum_buffer`` (``b``) and ``grad_avg`` (``ḡ``) are read and written only with
    ``has_momentum`` and ``centered``. Returns ``(param, s, b, ḡ)``.
    """
    grad = descent_direction(param, grad, grad_factor, weight_decay)
    square_avg = square_avg * alpha + alpha_complement * grad * grad
    if centered:
        grad_avg = lerp(grad_avg, grad, alpha_complement, alpha)
        average = math.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        average = math.sqrt(square_avg) + eps
    if has_momentum:
        momentum_buffer = momentum_buffer * momentum + grad / average
        param = param + neg_lr * momentum_buffer
    else:
        param = param + neg_lr * grad / average
    return param, square_avg, momentum_buffer, grad_avg


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` of the next step on the device (``capturable=True``,
    `kernels.capturable`), in float64 as `coefficients` computes them, and the step
    count they advance to (which no coefficient reads: torch counts it all the same):
    ``scalars`` is ``(t − 1,)``, ``settings`` is `live_settings`."""
    alpha, eps, weight_decay, momentum, sign = settings
    shared = (alpha, 1.0 - alpha, eps, sign * inverse_scale, weight_decay, momentum, -lr)
    return shared, (), (scalars[0] + 1.0,)


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: every hyperparameter but lr."""

    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    sign: float  # −1.0 with ``maximize``, else 1.0


def live_settings(alpha, eps, weight_decay, momentum, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    sign = -1.0 if maximize else 1.0
    return tuple(float(value) for value in LiveSettings(alpha, eps, weight_decay, momentum, sign))


SPEC = KernelSpec(
    "rmsprop",
    update,
    ("square_avg", "momentum_buffer", "grad_avg"),
    Coefficients,
    flags=("has_momentum", "centered"),
    optional=(("momentum_buffer", "has_momentum"), ("grad_avg", "centered")),
    codes=(("square_avg", UNSIGNED), ("momentum_buffer", SIGNED), ("grad_avg", SIGNED)),
    live=live_coefficients,
    live_settings=LiveSettings,
    scalars=("step",),
)


def check(lr, alpha, eps, weight_decay, momentum):
    """Raise ``ValueError`` for RMSprop settings that ``torch.optim.RMSprop`` rejects."""
    check_non_negative("learning rate", lr)
    check_non_negative("epsilon value", eps)
    check_non_negative("momentum value", momentum)
    check_non_negative("weight_decay value", weight_decay)
    check_non_negative("alpha value", alpha)


def coefficients(dtype, lr, alpha, eps, weight_decay, momentum, maximize, grad_scale=None):
    """`Coefficients` in ``dtype``."""
    named = Coefficients(
        alpha=alpha,
        alpha_complement=1.0 - alpha,
        eps=eps,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
        momentum=momentum,
        neg_lr=-lr,
    )
    return in_dtype(dtype, named)


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def rmsprop_step(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    grad_avg: np.ndarray | None = None,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    stream=None,
) -> None:
    """One RMSprop step, in place on ``param`` and its state arrays. With
    ``g = ±grad + λ·p``::

        s ← α·s + (1 − α)·g²
        ḡ ← α·ḡ + (1 − α)·g                 (centered: grad_avg)
        a = √(s − ḡ²) + ε   if centered,   else   √s + ε
        b ← μ·b + g/a;  p ← p − lr·b        (momentum > 0: momentum_buffer)
        p ← p − lr·g/a                      (otherwise)

    ``momentum_buffer`` is required when ``momentum > 0`` and ``grad_avg`` when
    ``centered``; each is ignored otherwise.
    """
    lr, alpha, eps, weight_decay, momentum = real_numbers(
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum
    )
    centered, maximize = as_flags(centered=centered, maximize=maximize)
    check(lr, alpha, eps, weight_decay, momentum)
    has_momentum = momentum > 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    if centered and grad_avg is None:
        raise ValueError("grad_avg is required when centered=True")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "square_avg": square_avg,
            "momentum_buffer": momentum_buffer if has_momentum else None,
            "grad_avg": grad_avg if centered else None,
        },
        stream,
    )
    shared = coefficients(compute_dtype(arrays), lr, alpha, eps, weight_decay, momentum, maximize)
    flags = (has_momentum, centered)
    kernels.launch(one_entry(arrays), SPEC, shared, flags, **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (rmsprop_step,)
