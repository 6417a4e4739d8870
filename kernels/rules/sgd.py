"""SGD: plain, and with heavy-ball or Nesterov momentum in either convention.

Each rule with its named coefficients (``NamedTuple``, in the rule's argument order
after the per-element values), its `steps.Step`, the checks torch.optim makes of its
hyperparameters (``ValueError``, torch's messages) and its coefficients built from them.
"""

from typing import NamedTuple

from numba.extending import register_jitable

from ..hyperparameters import check_finite, check_non_negative, grad_factor, in_dtype
from ..steps import SIGNED, Step
from .common import descent_direction

#: The momentum conventions: torch's (lr applied at the update) and lr folded into the
#: velocity (Polyak, Sutskever et al., Keras).
CONVENTIONS = ("pytorch", "lr_folded")


class PlainCoefficients(NamedTuple):
    """`plain`'s coefficients."""

    lr: float
    grad_factor: float
    weight_decay: float


@register_jitable
def plain(param, grad, lr, grad_factor, weight_decay):
    """SGD without momentum: ``p ← p − lr·d``."""
    return param - lr * descent_direction(param, grad, grad_factor, weight_decay)


PLAIN = Step("sgd_plain", plain, (), PlainCoefficients)


class MomentumCoefficients(NamedTuple):
    """`momentum`'s coefficients (``nesterov`` and ``first_step`` are flags)."""

    momentum: float
    dampening_complement: float
    grad_factor: float
    weight_decay: float
    velocity_scale: float
    update_scale: float


@register_jitable
def momentum(
    param,
    grad,
    velocity,
    momentum,
    dampening_complement,
    grad_factor,
    weight_decay,
    velocity_scale,
    update_scale,
    nesterov,
    first_step,
):
    """SGD with heavy-ball or Nesterov momentum, in either convention.

    With ``d = ±g + λ·p`` and ``s = velocity_scale``::

        first step:  v ← s·d
        later:       v ← μ·v + (1 − τ)·s·d
        step         = s·d + μ·v   if nesterov else   v
        p ← p − update_scale·step

    PyTorch's convention passes ``s = 1, update_scale = lr``; the lr-folded convention
    (Polyak, Sutskever et al., Keras) passes ``s = lr, update_scale = 1``, so the velocity
    carries the learning rate. Returns ``(param, velocity)``.
    """
    return _momentum(
        param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
        velocity_scale, update_scale, nesterov, first_step, False,
    )  # fmt: skip


@register_jitable
def blockwise_momentum(
    param,
    grad,
    velocity,
    momentum,
    dampening_complement,
    grad_factor,
    weight_decay,
    velocity_scale,
    update_scale,
    nesterov,
    first_step,
):
    """`momentum` as the 8-bit loops compute it (`steps.Step.blockwise_rule`): with no
    test of λ inside the loop (`common.descent_direction` unbranched)."""
    return _momentum(
        param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
        velocity_scale, update_scale, nesterov, first_step, True,
    )  # fmt: skip


@register_jitable
def _momentum(
    param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
    velocity_scale, update_scale, nesterov, first_step, unbranched,
):  # fmt: skip
    """`momentum`, or `blockwise_momentum` with ``unbranched`` (a constant where compiled)."""
    direction = velocity_scale * descent_direction(
        param, grad, grad_factor, weight_decay, unbranched
    )
    if first_step:
        velocity = direction
    else:
        velocity = momentum * velocity + dampening_complement * direction
    if nesterov:
        step = direction + momentum * velocity
    else:
        step = velocity
    return param - update_scale * step, velocity


MOMENTUM = Step(
    "sgd_momentum",
    momentum,
    ("momentum_buffer",),
    MomentumCoefficients,
    flags=("nesterov",),
    entry_flags=("first_step",),
    blockwise_rule=blockwise_momentum,
    codes=(("momentum_buffer", SIGNED),),
)


def check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention):
    """Raise ``ValueError`` for SGD settings that ``torch.optim.SGD`` rejects (or we do)."""
    check_non_negative("learning rate", lr)
    check_non_negative("momentum value", momentum)
    check_non_negative("weight_decay value", weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_finite("dampening value", dampening)
    check_convention(momentum_convention)


def check_convention(momentum_convention):
    """Raise ``ValueError`` unless ``momentum_convention`` is one we implement."""
    if momentum_convention not in CONVENTIONS:
        raise ValueError(
            f"Invalid momentum_convention: {momentum_convention!r}; expected one of {CONVENTIONS}"
        )


def plain_coefficients(dtype, lr, weight_decay, maximize, grad_scale=None):
    """`PlainCoefficients` ."""
    named = PlainCoefficients(
        lr=lr, grad_factor=grad_factor(maximize, grad_scale), weight_decay=weight_decay
    )
    return in_dtype(dtype, named)


def momentum_coefficients(
    dtype, lr, momentum, dampening, weight_decay, maximize, momentum_convention, grad_scale=None
):
    """`MomentumCoefficients`: the velocity carries lr in the lr-folded
    convention, the update applies it in PyTorch's."""
    lr_folded = momentum_convention == "lr_folded"
    named = MomentumCoefficients(
        momentum=momentum,
        dampening_complement=1.0 - dampening,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
        velocity_scale=lr if lr_folded else 1.0,
        update_scale=1.0 if lr_folded else lr,
    )
    return in_dtype(dtype, named)
