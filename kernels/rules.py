"""Per-element update rules, written once as plain Python.

Every function here works on scalars and returns the new values. ``register_jitable``
leaves each one an ordinary Python function (usable as a float64 reference) that Numba
compiles inline wherever a kernel calls it: the CPU loops of `kernels.cpu` and the CUDA
kernels alike. Scalars arrive already in the arrays' dtype (see
`kernels.hyperparameters`); the rules contain no float literals, so float32 arithmetic
stays float32.

Beside each rule, a ``NamedTuple`` names its coefficients in the rule's argument order
(those after the per-element values): `kernels.hyperparameters` builds them by name, and
tests/test_kernels.py checks every one against its rule's signature. After each rule, a
`steps.Step` says what arrays and values it takes, from which its loops and kernels
are generated. The kernels take
them as plain tuples (Numba 0.68 cannot unpack ``*coefficients`` from a named tuple,
and typing one costs 0.4 µs a call more than a tuple; see `hyperparameters.in_dtype`).
"""

import math
from typing import NamedTuple

from numba.extending import register_jitable

from .steps import Step


@register_jitable
def descent_direction(param, grad, grad_factor, weight_decay):
    """``d = f·g + λ·p``; ``f`` is ±1 (−1 when maximizing), divided by the AMP loss scale
    when the step unscales the gradient itself. L2 decay only if λ ≠ 0."""
    direction = grad_factor * grad
    if weight_decay != 0:
        direction = direction + weight_decay * param
    return direction


class SgdPlainCoefficients(NamedTuple):
    """`sgd_plain`'s coefficients."""

    lr: float
    grad_factor: float
    weight_decay: float


@register_jitable
def sgd_plain(param, grad, lr, grad_factor, weight_decay):
    """SGD without momentum: ``p ← p − lr·d``."""
    return param - lr * descent_direction(param, grad, grad_factor, weight_decay)


SGD_PLAIN = Step("sgd_plain", sgd_plain, (), SgdPlainCoefficients)


class SgdMomentumCoefficients(NamedTuple):
    """`sgd_momentum`'s coefficients (``nesterov`` and ``first_step`` are flags)."""

    momentum: float
    dampening_complement: float
    grad_factor: float
    weight_decay: float
    velocity_scale: float
    update_scale: float


@register_jitable
def sgd_momentum(
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
    direction = velocity_scale * descent_direction(param, grad, grad_factor, weight_decay)
    if first_step:
        velocity = direction
    else:
        velocity = momentum * velocity + dampening_complement * direction
    if nesterov:
        step = direction + momentum * velocity
    else:
        step = velocity
    return param - update_scale * step, velocity


SGD_MOMENTUM = Step(
    "sgd_momentum",
    sgd_momentum,
    ("momentum_buffer",),
    SgdMomentumCoefficients,
    flags=("nesterov",),
    entry_flags=("first_step",),
)


@register_jitable
def lerp(start, end, weight, weight_complement):
    """``start + w·(end − start)`` for ``w ∈ [0, 1]``, evaluated as torch's ``lerp`` does.

    ``w_c = 1 − w``. Torch picks the formula by ``|w| < 0.5``; for ``w ∈ [0, 1]`` that is
    ``w < w_c``, which compares two values of the arrays' dtype (a 0.5 literal would be
    float64 and cost a double-precision compare per element on a GPU).
    """
    if weight < weight_complement:
        return start + weight * (end - start)
    return end - (end - start) * weight_complement


@register_jitable
def nan_max(a, b):
    """The larger of ``a`` and ``b``, NaN if either is NaN (``torch.maximum``; the CUDA
    target's ``max`` would drop a NaN)."""
    if a > b or a != a:
        return a
    return b


class AdamCoefficients(NamedTuple):
    """`adam`'s coefficients that every parameter shares."""

    beta1: float
    beta1_complement: float
    beta2: float
    beta2_complement: float
    eps: float
    grad_factor: float
    weight_decay: float
    param_decay: float


class AdamStepCoefficients(NamedTuple):
    """`adam`'s coefficients of one parameter's step count (a launch table's entry
    values), after `AdamCoefficients`."""

    neg_step_size: float
    bias_correction2_sqrt: float


@register_jitable
def adam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    eps,
    grad_factor,
    weight_decay,
    param_decay,
    neg_step_size,
    bias_correction2_sqrt,
    amsgrad,
):
    """Adam / AdamW for one element, torch's for-loop arithmetic.

    ::

        p ← p·(1 − lr·λ)                     (AdamW: param_decay; 1 for Adam)
        g ← ±g + λ·p                          (Adam: weight_decay; 0 for AdamW)
        m ← lerp(m, g, 1 − β1)
        v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − (lr / (1 − β1ᵗ)) · m / (√v̂ / √(1 − β2ᵗ) + ε)

    ``neg_step_size`` is ``−lr / (1 − β1ᵗ)``. Returns ``(param, m, v, v̂max)``.
    """
    param = param * param_decay
    grad = descent_direction(param, grad, grad_factor, weight_decay)
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = math.sqrt(second_moment) / bias_correction2_sqrt + eps
    return param + neg_step_size * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq


ADAM = Step(
    "adam",
    adam,
    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    AdamCoefficients,
    AdamStepCoefficients,
    flags=("amsgrad",),
    optional=(("max_exp_avg_sq", "amsgrad"),),
    # arcp lets LLVM replace the division by the loop-invariant √(1 − β2ᵗ) with one
    # reciprocal and a multiply (≤1 ulp apart); Adam is compute-bound on division and
    # square root while the arrays sit in cache: 49 → 40 µs on the 784-256-10 MLP's 203k
    # float32 params.
    fastmath=frozenset({"arcp"}),
)
