"""RAdam (Liu et al., 2020): Adam whose adaptive step is rectified by the variance of
its second moment, or left out while that variance is intractable.

At step ``t`` the length of the approximated simple moving average,
``ρ_t = ρ_∞ − 2t·β2ᵗ/(1 − β2ᵗ)`` with ``ρ_∞ = 2/(1 − β2) − 1``, decides the step: past
5, Adam's step scaled by ``r_t = √((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t))``;
otherwise the bias-corrected momentum alone (SGD with momentum). ``ρ_t``, ``r_t`` and
which of the two steps are values of a parameter's step count (`step_values`, computed
on the host in double precision as torch computes them, or by `live_coefficients` on
the GPU with ``capturable=True``); the rule gets them as entry values and the choice as
an entry flag (``rectified``), so that each loop is compiled once per case, with no
test inside it.
"""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import in_dtype
from ..specs import SIGNED, UNSIGNED, KernelSpec
from . import adam
from .common import descent_direction, lerp

#: The coefficients every parameter shares: Adam's (`adam.Coefficients`).
Coefficients = adam.Coefficients

#: Built as Adam's: betas, eps, the gradient's factor, L2 or decoupled weight decay.
coefficients = adam.coefficients

#: torch.optim.RAdam's checks (Adam's, in the same order, with the same messages).
check = adam.check


class StepCoefficients(NamedTuple):
    """Each parameter's values at its step ``t`` (`step_values`), then the entry flag
    ``rectified`` (``ρ_t > 5``)."""

    bias_correction1: float  # 1 − β1ᵗ
    lr: float
    bias_correction2_sqrt: float  # √(1 − β2ᵗ)
    rectification: float  # r_t (0 when not rectified)


@register_jitable
def update(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    eps,
    grad_factor,
    weight_decay,
    param_decay,
    bias_correction1,
    lr,
    bias_correction2_sqrt,
    rectification,
    rectified,
):
    """RAdam for one element, torch's for-loop arithmetic::

        p ← p·(1 − lr·λ)                      (decoupled weight decay: param_decay)
        g ← ±g + λ·p                          (L2: weight_decay)
        m ← lerp(m, g, 1 − β1)
        v ← β2·v + (1 − β2)·g²
        s = (m / (1 − β1ᵗ))·lr
        s ← s · (√(1 − β2ᵗ) · 1/(√v + ε)) · r_t    if rectified (ρ_t > 5)
        p ← p − s

    Returns ``(param, m, v)``.
    """
    return _update(
        param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
        eps, grad_factor, weight_decay, param_decay, bias_correction1, lr,
        bias_correction2_sqrt, rectification, rectified, False,
    )  # fmt: skip


@register_jitable
def blockwise_update(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    eps,
    grad_factor,
    weight_decay,
    param_decay,
    bias_correction1,
    lr,
    bias_correction2_sqrt,
    rectification,
    rectified,
):
    """`update` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`), as
    `adam.blockwise_update` computes Adam's: no test of λ or of the lerp's weight, and
    ``m · (1/(1 − β1ᵗ))``, a loop invariant's reciprocal, in place of a division. The
    moments are `update`'s (but the sign of a zero); the parameter differs, measured
    over 10 rectified steps of 2^20 elements at lr 10⁻², in 0.04% of standard normal
    parameters a step and 0.6% of parameters of many magnitudes, by up to 6 ulps of its
    larger value before or after the step (tests/test_quantized_loops.py)."""
    return _update(
        param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
        eps, grad_factor, weight_decay, param_decay, bias_correction1, lr,
        bias_correction2_sqrt, rectification, rectified, True,
    )  # fmt: skip


@register_jitable
def _update(
    param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
    eps, grad_factor, weight_decay, param_decay, bias_correction1, lr,
    bias_correction2_sqrt, rectification, rectified, blockwise,
):  # fmt: skip
    """`update`, or `blockwise_update` with ``blockwise`` (a constant where compiled)."""
    param = param * param_decay
    grad = descent_direction(param, grad, grad_factor, weight_decay, blockwise)
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1, blockwise)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    if blockwise:
        step = exp_avg * (np.float32(1) / bias_correction1) * lr
    else:
        step = exp_avg / bias_correction1 * lr
    if rectified:  # torch: a number over a tensor is its reciprocal times the number
        adaptive = bias_correction2_sqrt * (np.float32(1) / (math.sqrt(exp_avg_sq) + eps))
        step = step * adaptive * rectification
    return param - step, exp_avg, exp_avg_sq


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients`, `StepCoefficients` and ``rectified`` (1 or 0) of the next step
    on the device (``capturable=True``, `kernels.capturable`), in float64 as
    `coefficients` and `_radam_step_values` compute them, and the step count they
    advance to: ``scalars`` is ``(t − 1,)``, ``settings`` is `live_settings`."""
    beta1, beta2 = settings[0], settings[1]
    step = scalars[0] + 1.0
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rectified, rectification = 1.0, math.nan  # β2 set to 1 (`_radam_step_values`)
    if 1.0 - beta2 != 0.0 and bias_correction2 != 0.0:
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * (beta2**step) / bias_correction2
        rectified, rectification = 0.0, 0.0
        if rho_t > 5.0:
            rect = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
            rectified = 1.0
            rectification = (rect / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
    sqrt2 = bias_correction2**0.5 if bias_correction2 >= 0.0 else math.nan
    entry = (bias_correction1, lr, sqrt2, rectification, rectified)
    return adam.live_shared(lr, inverse_scale, settings), entry, (step,)


#: What `live_coefficients` takes from the host: Adam's (`adam.live_settings`).
live_settings = adam.live_settings

SPEC = KernelSpec(
    "radam",
    update,
    ("exp_avg", "exp_avg_sq"),
    Coefficients,
    StepCoefficients,
    entry_flags=("rectified",),
    blockwise_rule=blockwise_update,
    codes=(("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)),
    live=live_coefficients,
    live_settings=adam.LiveSettings,
    scalars=("step",),
)


def _radam_step_values(step, lr, betas):
    """`StepCoefficients` and ``rectified`` of step ``step``, in Python floats with
    torch's expressions (its ``** 0.5`` too: C's ``pow``, not ``sqrt``)."""
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    try:
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rectified = rho_t > 5
        if rectified:
            rect = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            rectification = rect**0.5
    except ZeroDivisionError:
        # β2 set to 1 after construction (torch checks betas only there; its step
        # raises after stepping the parameters before): IEEE values, not an
        # exception after some buckets have stepped
        rectified, rectification = True, math.nan
    if not rectified:
        rectification = 0.0
    elif isinstance(rectification, complex):  # betas outside [0, 1): no real r_t
        rectification = math.nan
    sqrt2 = bias_correction2**0.5 if bias_correction2 >= 0 else math.nan
    return (bias_correction1, lr, sqrt2, rectification, float(rectified))


def step_values(steps, lr, betas):
    """Rows of `StepCoefficients` and the flag ``rectified`` for parameters at steps
    ``steps`` (this step's counts, ≥ 1): each distinct count computed once."""
    steps = np.asarray(steps, np.float64)
    first = float(steps[0])
    if (steps == first).all():  # the common case: every parameter at the same step
        return np.array([_radam_step_values(first, lr, betas)])
    counts, which = np.unique(steps, return_inverse=True)
    rows = [_radam_step_values(count, lr, betas) for count in counts.tolist()]
    return np.array(rows)[which]


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def radam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    stream=None,
) -> None:
    """One RAdam step (Liu et al., 2020), in place on ``param`` and the moment buffers.

    ``step`` is this step's count t ≥ 1. With ``g = ±grad``, ``ρ_∞ = 2/(1 − β2) − 1``
    and ``ρ_t = ρ_∞ − 2t·β2ᵗ/(1 − β2ᵗ)``::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        m̂ = m / (1 − β1ᵗ)
        p ← p − lr·m̂·r_t·√(1 − β2ᵗ)/(√v + ε)    if ρ_t > 5
        p ← p − lr·m̂                             otherwise

    with ``r_t = √((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t))``.
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    decoupled_weight_decay, maximize = as_flags(
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize
    )
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, stream
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize)
    table = one_entry(arrays, in_dtype(dtype, _radam_step_values(step, lr, betas)))
    kernels.launch(table, SPEC, shared, **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (radam_step,)
