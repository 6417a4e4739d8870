"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with the infinity norm in place of the
second moment, as torch.optim.Adamax computes it.

The second state is an exponentially weighted infinity norm of the gradients,
``u ← max(β2·u, |g| + ε)``: ε enters inside the maximum, not in a denominator of its
own. Only the first moment is bias corrected, in the step size ``−lr/(1 − β1ᵗ)``, a
value of each parameter's step count (`step_coefficients_per_entry`).
"""

from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import grad_factor, in_dtype
from ..specs import SIGNED, UNSIGNED, KernelSpec
from . import adam
from .common import descent_direction, lerp, nan_max

#: torch.optim.Adamax's checks (Adam's, in the same order, with the same messages).
check = adam.check


class Coefficients(NamedTuple):
    """`update`'s coefficients that every parameter shares."""

    beta1: float
    beta1_complement: float
    beta2: float
    eps: float
    grad_factor: float
    weight_decay: float


class StepCoefficients(NamedTuple):
    """`update`'s coefficient of one parameter's step count (a launch table's entry
    value), after `Coefficients`."""

    neg_step_size: float  # −lr/(1 − β1ᵗ)


@register_jitable
def update(
    param,
    grad,
    exp_avg,
    exp_inf,
    beta1,
    beta1_complement,
    beta2,
    eps,
    grad_factor,
    weight_decay,
    neg_step_size,
):
    """Adamax for one element, torch's for-loop arithmetic::

        g ← ±g + λ·p
        m ← lerp(m, g, 1 − β1)
        u ← max(β2·u, |g| + ε)              (NaN if either is NaN, as torch.maximum)
        p ← p + (−lr/(1 − β1ᵗ))·m / u       (torch's addcdiv: the product, then the quotient)

    Returns ``(param, m, u)``.
    """
    return _update(
        param, grad, exp_avg, exp_inf, beta1, beta1_complement, beta2, eps, grad_factor,
        weight_decay, neg_step_size, False,
    )  # fmt: skip


@register_jitable
def blockwise_update(
    param,
    grad,
    exp_avg,
    exp_inf,
    beta1,
    beta1_complement,
    beta2,
    eps,
    grad_factor,
    weight_decay,
    neg_step_size,
):
    """`update` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`): no
    test of λ or of the lerp's weight inside the loop (`common.descent_direction`,
    `common.lerp` unbranched), as `adam.blockwise_update`."""
    return _update(
        param, grad, exp_avg, exp_inf, beta1, beta1_complement, beta2, eps, grad_factor,
        weight_decay, neg_step_size, True,
    )  # fmt: skip


@register_jitable
def _update(
    param, grad, exp_avg, exp_inf, beta1, beta1_complement, beta2, eps, grad_factor,
    weight_decay, neg_step_size, blockwise,
):  # fmt: skip
    """`update`, or `blockwise_update` with ``blockwise`` (a constant where compiled)."""
    grad = descent_direction(param, grad, grad_factor, weight_decay, blockwise)
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1, blockwise)
    exp_inf = nan_max(exp_inf * beta2, abs(grad) + eps)
    return param + neg_step_size * exp_avg / exp_inf, exp_avg, exp_inf


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` and `StepCoefficients` of the next step on the device
    (``capturable=True``, `kernels.capturable`), in float64 as `coefficients` and
    `_neg_step_size` compute them, and the step count they advance to: ``scalars`` is
    ``(t − 1,)``, ``settings`` is `live_settings`."""
    beta1, beta2, eps, weight_decay, sign = settings
    step = scalars[0] + 1.0
    shared = (beta1, 1.0 - beta1, beta2, eps, sign * inverse_scale, weight_decay)
    return shared, (-(lr / (1.0 - beta1**step)),), (step,)


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: every hyperparameter but lr."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    sign: float  # −1.0 with ``maximize``, else 1.0


def live_settings(betas, eps, weight_decay, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    sign = -1.0 if maximize else 1.0
    return tuple(float(value) for value in LiveSettings(*betas, eps, weight_decay, sign))


SPEC = KernelSpec(
    "adamax",
    update,
    ("exp_avg", "exp_inf"),
    Coefficients,
    StepCoefficients,
    blockwise_rule=blockwise_update,
    codes=(("exp_avg", SIGNED), ("exp_inf", UNSIGNED)),
    live=live_coefficients,
    live_settings=LiveSettings,
    scalars=("step",),
)


def coefficients(dtype, betas, eps, weight_decay, maximize, grad_scale=None):
    """`Coefficients`."""
    beta1, beta2 = betas
    named = Coefficients(
        beta1=beta1,
        beta1_complement=1.0 - beta1,
        beta2=beta2,
        eps=eps,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
    )
    return in_dtype(dtype, named)


def _neg_step_size(step, lr, beta1):
    """torch's ``−(lr / (1 − β1ᵗ))`` in Python floats; IEEE values where β1 was set to 1
    after construction (torch checks betas only there), not an exception after some
    buckets have stepped."""
    bias_correction = 1 - beta1**step
    if bias_correction == 0:
        with np.errstate(all="ignore"):
            return float(-(np.float64(lr) / np.float64(bias_correction)))
    return -(lr / bias_correction)


def step_coefficients_per_entry(dtype, steps, lr, betas):
    """Rows of `StepCoefficients` for parameters at steps ``steps`` (this step's
    counts, ≥ 1), in ``dtype``: each distinct count computed once."""
    steps = np.asarray(steps, np.float64)
    first = float(steps[0])
    if (steps == first).all():  # the common case: every parameter at the same step
        return np.array([[_neg_step_size(first, lr, betas[0])]], dtype)
    counts, which = np.unique(steps, return_inverse=True)
    rows = [[_neg_step_size(count, lr, betas[0])] for count in counts.tolist()]
    return np.array(rows, dtype)[which]


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def adamax_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stream=None,
) -> None:
    """One Adamax step (Kingma & Ba, 2015, section 7.1), in place on ``param``,
    ``exp_avg`` and ``exp_inf``.

    ``step`` is this step's count t ≥ 1. With ``g = ±grad + λ·p``::

        m ← β1·m + (1 − β1)·g
        u ← max(β2·u, |g| + ε)
        p ← p − lr/(1 − β1ᵗ) · m / u
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    (maximize,) = as_flags(maximize=maximize)
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_inf": exp_inf}, stream
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, betas, eps, weight_decay, maximize)
    per_step = tuple(step_coefficients_per_entry(dtype, [step], lr, betas)[0])
    kernels.launch(one_entry(arrays, per_step), SPEC, shared, **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (adamax_step,)
