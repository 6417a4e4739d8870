"""NAdam (Dozat, 2016): Adam with Nesterov momentum, as torch.optim.NAdam computes it.

The momentum coefficient changes with the step, ``μ_t = β1·(1 − ½·0.96^(t·ψ))``
(``ψ``: ``momentum_decay``), and each parameter keeps the product of its ``μ``s. The
per-element rule needs only three values of a parameter's step: the two step sizes and
``1 − β2ᵗ`` (`step_values`, computed on the host, in torch's precision; with
``capturable=True``, `live_coefficients` on the GPU, with the same numbers).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import float32, float64
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_non_negative, in_dtype
from ..specs import SIGNED, UNSIGNED, KernelSpec
from . import adam
from .common import descent_direction, lerp

#: The coefficients every parameter shares: Adam's (`adam.Coefficients`).
Coefficients = adam.Coefficients

#: Built as Adam's: betas, eps, the gradient's factor, L2 or decoupled weight decay.
coefficients = adam.coefficients


class StepCoefficients(NamedTuple):
    """Each parameter's values at its step ``t`` (`step_values`)."""

    grad_step: float  # −lr·(1 − μ_t) / (1 − Π_t)
    average_step: float  # −lr·μ_{t+1} / (1 − Π_t·μ_{t+1})
    bias_correction2: float  # 1 − β2ᵗ


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
    grad_step,
    average_step,
    bias_correction2,
):
    """NAdam for one element, torch's for-loop arithmetic::

        p ← p·(1 − lr·λ)                      (decoupled weight decay: param_decay)
        g ← ±g + λ·p                          (L2: weight_decay)
        m ← lerp(m, g, 1 − β1)
        v ← β2·v + (1 − β2)·g²
        d = √(v / (1 − β2ᵗ)) + ε
        p ← p + grad_step·g / d
        p ← p + average_step·m / d

    Returns ``(param, m, v)``.
    """
    return _update(
        param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
        eps, grad_factor, weight_decay, param_decay, grad_step, average_step,
        bias_correction2, False,
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
    grad_step,
    average_step,
    bias_correction2,
):
    """`update` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`), where no
    torch bits are to be matched: no test of λ or of the lerp's weight
    (`common.descent_direction`, `common.lerp` unbranched), ``v · (1/(1 − β2ᵗ))`` with
    the reciprocal computed once per loop, and one division per element, ``1/d``, that
    both steps multiply by: one division where `update` makes three. The moments are
    `update`'s (but the sign of a zero); the parameter differs, measured over 10 steps
    of 2^20 elements at lr 2·10⁻³, in 0.24% of standard normal parameters a step, by up
    to 8 ulps of its larger value before or after the step, and in 2.7% of parameters
    of many magnitudes, by up to 32 ulps (its two terms may exceed it and cancel;
    tests/test_quantized_loops.py, bench/NOTES.md entry 32)."""
    return _update(
        param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
        eps, grad_factor, weight_decay, param_decay, grad_step, average_step,
        bias_correction2, True,
    )  # fmt: skip


@register_jitable
def _update(
    param, grad, exp_avg, exp_avg_sq, beta1, beta1_complement, beta2, beta2_complement,
    eps, grad_factor, weight_decay, param_decay, grad_step, average_step,
    bias_correction2, blockwise,
):  # fmt: skip
    """`update`, or `blockwise_update` with ``blockwise`` (a constant where compiled)."""
    param = param * param_decay
    grad = descent_direction(param, grad, grad_factor, weight_decay, blockwise)
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1, blockwise)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    if blockwise:  # a loop invariant's reciprocal: hoisted out of the loop
        denom = math.sqrt(exp_avg_sq * (np.float32(1) / bias_correction2)) + eps
        inverse = np.float32(1) / denom
        param = param + grad_step * grad * inverse
        return param + average_step * exp_avg * inverse, exp_avg, exp_avg_sq
    denom = math.sqrt(exp_avg_sq / bias_correction2) + eps
    param = param + grad_step * grad / denom
    param = param + average_step * exp_avg / denom
    return param, exp_avg, exp_avg_sq


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` and `StepCoefficients` of the next step on the device
    (``capturable=True``, `kernels.capturable`), in float64 as `coefficients` and
    `step_values` compute them, and the state they advance to: ``scalars`` is
    ``(t − 1, Π_{t−1})``, ``settings`` is `live_settings`; the new ``Π_t`` is rounded
    to float32 where torch keeps it so (`step_values`' ``product_dtype``), before
    the step sizes read it."""
    beta1, beta2 = settings[0], settings[1]
    momentum_decay, single = settings[6], settings[7]
    step = scalars[0] + 1.0
    mu = momentum_cache(step, beta1, momentum_decay)
    mu_next = momentum_cache(step + 1.0, beta1, momentum_decay)
    if single:  # a float32 product of float32 factors: exact in float64, then rounded
        product = float64(float32(scalars[1] * float64(float32(mu))))
    else:
        product = scalars[1] * mu
    entry = (
        -lr * (1.0 - mu) / (1.0 - product),
        (-lr * mu_next) / (1.0 - product * mu_next),
        1.0 - beta2**step,
    )
    return adam.live_shared(lr, inverse_scale, settings), entry, (step, product)


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: Adam's (`adam.LiveSettings`), then
    NAdam's own."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: float
    sign: float
    momentum_decay: float
    single: float  # 1.0 when ``mu_product`` is kept in float32


def live_settings(betas, eps, weight_decay, decoupled, maximize, momentum_decay, product_dtype):
    """`LiveSettings`, flat, as the plain tuple of floats kernels take."""
    single = np.dtype(product_dtype) == np.float32
    return (*adam.live_settings(betas, eps, weight_decay, decoupled, maximize),
            float(momentum_decay), float(single))  # fmt: skip


SPEC = KernelSpec(
    "nadam",
    update,
    ("exp_avg", "exp_avg_sq"),
    Coefficients,
    StepCoefficients,
    blockwise_rule=blockwise_update,
    codes=(("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)),
    live=live_coefficients,
    live_settings=LiveSettings,
    scalars=("step", "mu_product"),
)


def check(lr, betas, eps, weight_decay, momentum_decay):
    """Raise ``ValueError`` for NAdam settings that ``torch.optim.NAdam`` rejects."""
    adam.check(lr, betas, eps, weight_decay)
    check_non_negative("momentum_decay value", momentum_decay)


@register_jitable
def momentum_cache(step, beta1, momentum_decay):
    """``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (arrays of steps too), in double precision."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def step_values(steps, mu_products, lr, betas, momentum_decay, product_dtype):
    """For parameters at steps ``steps`` (this step's counts, ≥ 1) whose products of
    ``μ`` were ``mu_products`` before it: their new products (rounded to
    ``product_dtype``, the dtype torch keeps ``mu_product`` in) and rows of
    `StepCoefficients`, in double precision as torch computes them."""
    beta1, beta2 = betas
    counts, which = np.unique(np.asarray(steps, np.float64), return_inverse=True)
    # in Python floats, C's pow as torch's: NumPy's vectorised power (SVML on AVX-512)
    # gave μ_t an ulp off at 224 of the first 10⁵ steps (t = 2, 8, …)
    rows = [
        (momentum_cache(t, beta1, momentum_decay), momentum_cache(t + 1, beta1, momentum_decay),
         1.0 - beta2**t)
        for t in counts.tolist()
    ]  # fmt: skip
    mu, mu_next, bias_correction2 = np.array(rows).reshape(-1, 3)[which].T
    dtype = np.dtype(product_dtype)
    products = (np.asarray(mu_products, dtype) * mu.astype(dtype)).astype(dtype)
    product = products.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        grad_step = -lr * (1.0 - mu) / (1.0 - product)
        average_step = (-lr * mu_next) / (1.0 - product * mu_next)
    return products, np.stack([grad_step, average_step, bias_correction2], axis=-1)


def step_coefficients(dtype, step, mu_product, lr, betas, momentum_decay, product_dtype):
    """One parameter's new product of ``μ`` and its `StepCoefficients` in ``dtype``."""
    products, rows = step_values([step], [mu_product], lr, betas, momentum_decay, product_dtype)
    return float(products[0]), in_dtype(dtype, StepCoefficients(*rows[0]))


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def nadam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float = 1.0,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    stream=None,
) -> float:
    """One NAdam step (Dozat, 2016), in place on ``param`` and the moment buffers;
    returns the new ``mu_product`` to pass to the next call.

    ``step`` is this step's count t ≥ 1, ``mu_product`` the product of the earlier
    steps' momentum coefficients (1.0 before the first). With ``g = ±grad`` and
    ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (``ψ = momentum_decay``)::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        Π ← Π·μ_t                        (the returned mu_product)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        d = √(v / (1 − β2ᵗ)) + ε
        p ← p − lr·(1 − μ_t)/(1 − Π) · g/d − lr·μ_{t+1}/(1 − Π·μ_{t+1}) · m/d

    ``Π`` is kept in float32 for float32 (and 16-bit) arrays, as torch keeps it.
    """
    lr, eps, weight_decay, momentum_decay, mu_product = real_numbers(
        lr=lr, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
        mu_product=mu_product,
    )  # fmt: skip
    betas = hyperparameters.as_betas(betas)
    decoupled_weight_decay, maximize = as_flags(
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize
    )
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay, momentum_decay)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, stream
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize)
    product, per_step = step_coefficients(dtype, step, mu_product, lr, betas, momentum_decay, dtype)
    table = one_entry(arrays, per_step)
    kernels.launch(table, SPEC, shared, **launch)
    return product


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (nadam_step,)
