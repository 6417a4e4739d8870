"""RMSprop (Hinton's lecture 6e), optionally centered and with momentum, as
torch.optim.RMSprop computes it."""

import math
from typing import NamedTuple

from numba.extending import register_jitable

from ..hyperparameters import check_non_negative, grad_factor, in_dtype
from ..steps import SIGNED, UNSIGNED, Step
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


STEP = Step(
    "rmsprop",
    update,
    ("square_avg", "momentum_buffer", "grad_avg"),
    Coefficients,
    flags=("has_momentum", "centered"),
    optional=(("momentum_buffer", "has_momentum"), ("grad_avg", "centered")),
    codes=(("square_avg", UNSIGNED), ("momentum_buffer", SIGNED), ("grad_avg", SIGNED)),
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
