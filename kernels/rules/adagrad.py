"""Adagrad (Duchi et al., 2011), as torch.optim.Adagrad computes it."""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_non_negative, grad_factor, in_dtype
from ..specs import UNSIGNED, KernelSpec
from .common import descent_direction


class Coefficients(NamedTuple):
    """`update`'s coefficients every parameter shares."""

    eps: float
    grad_factor: float
    weight_decay: float


class StepCoefficients(NamedTuple):
    """A parameter's value at its step ``t``: ``−lr / (1 + (t − 1)·lr_decay)``."""

    neg_step_size: float


@register_jitable
def update(param, grad, state_sum, eps, grad_factor, weight_decay, neg_step_size):
    """Adagrad for one element, torch's for-loop arithmetic::

        g ← ±g + λ·p
        s ← s + g²
        p ← p − lr_t · g / (√s + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)

    Returns ``(param, s)``.
    """
    return _update(param, grad, state_sum, eps, grad_factor, weight_decay, neg_step_size, False)


@register_jitable
def blockwise_update(param, grad, state_sum, eps, grad_factor, weight_decay, neg_step_size):
    """`update` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`): with no test
    of λ inside the loop (`common.descent_direction` unbranched)."""
    return _update(param, grad, state_sum, eps, grad_factor, weight_decay, neg_step_size, True)


@register_jitable
def _update(param, grad, state_sum, eps, grad_factor, weight_decay, neg_step_size, unbranched):
    """`update`, or `blockwise_update` with ``unbranched`` (a constant where compiled)."""
    grad = descent_direction(param, grad, grad_factor, weight_decay, unbranched)
    state_sum = state_sum + grad * grad
    std = math.sqrt(state_sum) + eps
    return param + neg_step_size * grad / std, state_sum


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` and `StepCoefficients` of the next step on the device
    (``capturable=True``, `kernels.capturable`), in float64 as `coefficients` and
    `step_coefficients_per_entry` compute them, and the step count they advance to:
    ``scalars`` is ``(t − 1,)``, ``settings`` is `live_settings`."""
    eps, weight_decay, lr_decay, sign = settings
    step = scalars[0] + 1.0
    neg_step_size = -(lr / (1.0 + (step - 1.0) * lr_decay))
    return (eps, sign * inverse_scale, weight_decay), (neg_step_size,), (step,)


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: every hyperparameter but lr."""

    eps: float
    weight_decay: float
    lr_decay: float
    sign: float  # −1.0 with ``maximize``, else 1.0


def live_settings(eps, weight_decay, lr_decay, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    sign = -1.0 if maximize else 1.0
    return tuple(float(value) for value in LiveSettings(eps, weight_decay, lr_decay, sign))


SPEC = KernelSpec(
    "adagrad",
    update,
    ("sum",),
    Coefficients,
    StepCoefficients,
    blockwise_rule=blockwise_update,
    codes=(("sum", UNSIGNED),),
    live=live_coefficients,
    live_settings=LiveSettings,
    scalars=("step",),
)


def check(lr, lr_decay, weight_decay, initial_accumulator_value, eps):
    """Raise ``ValueError`` for Adagrad settings that ``torch.optim.Adagrad`` rejects."""
    check_non_negative("learning rate", lr)
    check_non_negative("lr_decay value", lr_decay)
    check_non_negative("weight_decay value", weight_decay)
    check_non_negative("initial_accumulator_value value", initial_accumulator_value)
    check_non_negative("epsilon value", eps)


def coefficients(dtype, eps, weight_decay, maximize, grad_scale=None):
    """`Coefficients` in ``dtype``."""
    named = Coefficients(
        eps=eps, grad_factor=grad_factor(maximize, grad_scale), weight_decay=weight_decay
    )
    return in_dtype(dtype, named)


def step_coefficients_per_entry(dtype, steps, lr, lr_decay):
    """Rows of `StepCoefficients` for parameters at steps ``steps`` (this step's counts,
    ≥ 1), in double precision as torch computes them, then in ``dtype``."""
    steps = np.asarray(steps, np.float64)
    return (-(lr / (1.0 + (steps - 1.0) * lr_decay))).astype(dtype).reshape(-1, 1)


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def adagrad_step(
    param: np.ndarray,
    grad: np.ndarray,
    state_sum: np.ndarray,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    stream=None,
) -> None:
    """One Adagrad step, in place on ``param`` and ``state_sum`` (torch's ``sum``: start
    it at ``initial_accumulator_value``). ``step`` is this step's count t ≥ 1. With
    ``g = ±grad + λ·p``::

        s ← s + g²
        p ← p − lr_t · g / (√s + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)
    """
    lr, lr_decay, weight_decay, eps = real_numbers(
        lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps
    )
    (maximize,) = as_flags(maximize=maximize)
    step = hyperparameters.as_step(step)
    check(lr, lr_decay, weight_decay, 0.0, eps)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "state_sum": state_sum}, stream
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, eps, weight_decay, maximize)
    step_size = step_coefficients_per_entry(dtype, [step], lr, lr_decay)[0]
    table = one_entry(arrays, tuple(step_size))
    kernels.launch(table, SPEC, shared, **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (adagrad_step,)
