"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019), optionally AMSGrad.

The rule with its named coefficients (those every parameter shares, and those of each
parameter's step count), its `specs.KernelSpec`, torch.optim's checks of its hyperparameters
and its coefficients built from them.
"""

import math
from typing import Literal, NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_non_negative, grad_factor, in_dtype
from ..precision import fused_multiply_add, true_divide
from ..specs import SIGNED, UNSIGNED, KernelSpec, int8_blockwise
from .common import descent_direction, fused_descent_direction, fused_lerp, lerp, nan_max


class Coefficients(NamedTuple):
    """`update`'s coefficients that every parameter shares."""

    beta1: float
    beta1_complement: float
    beta2: float
    beta2_complement: float
    eps: float
    grad_factor: float
    weight_decay: float
    param_decay: float


class StepCoefficients(NamedTuple):
    """`update`'s coefficients of one parameter's step count (a launch table's entry
    values), after `Coefficients`."""

    neg_step_size: float
    bias_correction2_sqrt: float


@register_jitable
def update(
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
    return _update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta1_complement, beta2,
        beta2_complement, eps, grad_factor, weight_decay, param_decay, neg_step_size,
        bias_correction2_sqrt, amsgrad, False, False,
    )  # fmt: skip


@register_jitable
def blockwise_update(
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
    """`update` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`), where no
    torch bits are to be matched (the codes keep 1/254 of a block's range): no test of
    λ or of the lerp's weight (`common.descent_direction`, `common.lerp` unbranched),
    and ``√v̂ · (1/√(1 − β2ᵗ))``, whose reciprocal is computed once per loop, in place of
    a division per element. The moments are `update`'s (but the sign of a zero); the
    parameter differs where the step's last bit moves its rounding: measured over 10
    steps of 2^20 elements at lr 10⁻², in 0.4% of standard normal parameters a step and
    1.3-1.9% of parameters of many magnitudes, by up to 4 ulps of its larger value
    before or after the step (tests/test_quantized_loops.py). On 2 AMD EPYC cores the
    8-bit step took 5-10% less time (bench/NOTES.md entry 23)."""
    return _update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta1_complement, beta2,
        beta2_complement, eps, grad_factor, weight_decay, param_decay, neg_step_size,
        bias_correction2_sqrt, amsgrad, False, True,
    )  # fmt: skip


@register_jitable
def fused_update(
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
    """`update` as ``torch.optim.Adam(fused=True)`` computes 16-bit parameters on the CPU
    (float32 arithmetic, AVX2 or AVX-512 kernels): three of its multiply-adds are rounded
    once, ``g ← fma(λ, p, ±g)``, ``m ← fma(1 − β1, g − m, m)`` (`common.fused_lerp`) and
    ``v ← fma((1 − β2)·g, g, β2·v)``; the rest as `update`. With the products rounded
    first, as `update` does, about one element of exp_avg in 10⁴ rounds to a different
    bfloat16 at each step (measured against torch's kernels without a vector unit, 20
    steps of 2²⁰ elements: 0.8·10⁻⁴ a step; tests/test_precision_rate.py checks that
    such elements exist, not their rate).
    """
    return _update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta1_complement, beta2,
        beta2_complement, eps, grad_factor, weight_decay, param_decay, neg_step_size,
        bias_correction2_sqrt, amsgrad, True, False,
    )  # fmt: skip


@register_jitable
def _update(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta1_complement, beta2,
    beta2_complement, eps, grad_factor, weight_decay, param_decay, neg_step_size,
    bias_correction2_sqrt, amsgrad, fused, blockwise,
):  # fmt: skip
    """`update` (``fused`` and ``blockwise`` False), `fused_update` (``fused``) or
    `blockwise_update` (``blockwise``); both constants where compiled."""
    param = param * param_decay
    if fused:
        grad = fused_descent_direction(param, grad, grad_factor, weight_decay)
        exp_avg = fused_lerp(exp_avg, grad, beta1_complement, beta1)
        exp_avg_sq = fused_multiply_add(beta2_complement * grad, grad, exp_avg_sq * beta2)
    else:
        grad = descent_direction(param, grad, grad_factor, weight_decay, blockwise)
        exp_avg = lerp(exp_avg, grad, beta1_complement, beta1, blockwise)
        exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    if fused:  # torch divides, rounding each quotient
        denom = true_divide(math.sqrt(second_moment), bias_correction2_sqrt) + eps
        update = true_divide(neg_step_size * exp_avg, denom)
    elif blockwise:  # a loop invariant's reciprocal: hoisted out of the loop
        denom = math.sqrt(second_moment) * (np.float32(1) / bias_correction2_sqrt) + eps
        update = neg_step_size * exp_avg / denom
    else:  # an exact division, whatever the loop's arcp (see SPEC)
        denom = true_divide(math.sqrt(second_moment), bias_correction2_sqrt) + eps
        update = neg_step_size * exp_avg / denom
    return param + update, exp_avg, exp_avg_sq, max_exp_avg_sq


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: every hyperparameter but lr."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: float  # 1.0 for AdamW's decoupled weight decay, else 0.0
    sign: float  # −1.0 with ``maximize``, else 1.0


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` and `StepCoefficients` of the next step on the device
    (``capturable=True``, `kernels.capturable`), in float64 as `coefficients` and
    `step_coefficients` compute them from Python floats, and the step count they
    advance to: ``scalars`` is ``(t − 1,)``, ``settings`` is `live_settings`."""
    beta1, beta2 = settings[0], settings[1]
    step = scalars[0] + 1.0
    # torch's ** 0.5, C's pow: not always the square root (≈1 step in 1000, t = 1270 for
    # β2 = 0.999, an ulp apart in float64)
    entry = (-lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5)
    return live_shared(lr, inverse_scale, settings), entry, (step,)


@register_jitable
def live_shared(lr, inverse_scale, settings):
    """`Coefficients` on the device, as `coefficients` computes them from Python floats
    (also NAdam's and RAdam's): ``settings`` starts as `live_settings`."""
    beta1, beta2, eps, weight_decay, decoupled, sign = settings[:6]
    return (
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        sign * inverse_scale,
        0.0 if decoupled else weight_decay,
        1.0 - lr * weight_decay if decoupled else 1.0,
    )


def live_settings(betas, eps, weight_decay, decoupled, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    beta1, beta2 = betas
    sign = -1.0 if maximize else 1.0
    named = LiveSettings(beta1, beta2, eps, weight_decay, decoupled, sign)
    return tuple(float(value) for value in named)


SPEC = KernelSpec(
    "adam",
    update,
    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    Coefficients,
    StepCoefficients,
    flags=("amsgrad",),
    optional=(("max_exp_avg_sq", "amsgrad"),),
    fused_rule=fused_update,
    blockwise_rule=blockwise_update,
    codes=(("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED), ("max_exp_avg_sq", UNSIGNED)),
    live=live_coefficients,
    live_settings=LiveSettings,
    scalars=("step",),
    # arcp was meant to let LLVM replace the division by the loop-invariant √(1 − β2ᵗ)
    # with one reciprocal and a multiply; in the loops as compiled up to 5fb2c0c it
    # never did (2 vdivps per vector loop, every variant: bench/NOTES.md entry 23), and
    # whether it does turned on unrelated edits of `_update`: `update` now divides
    # exactly there (`precision.true_divide`), keeping those bits, and
    # `blockwise_update` multiplies by the reciprocal itself.
    fastmath=frozenset({"arcp"}),
)


def check(lr, betas, eps, weight_decay):
    """Raise ``ValueError`` for Adam settings that ``torch.optim.Adam`` rejects, in its
    order and with its messages (the values may be 1-element tensors)."""
    check_non_negative("learning rate", lr)
    check_non_negative("epsilon value", eps)
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")
    check_non_negative("weight_decay value", weight_decay)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")


def coefficients(dtype, lr, betas, eps, weight_decay, decoupled, maximize, grad_scale=None):
    """`Coefficients`: those of `update` that do not change with the step."""
    beta1, beta2 = betas
    named = Coefficients(
        beta1=beta1,
        # torch: in the params' dtype (Python floats: at least as wide)
        beta1_complement=1.0 - float(beta1),
        beta2=beta2,
        # a NumPy float32 beta (a float32 tensor in torch) stays float32
        beta2_complement=1.0 - beta2,
        eps=eps,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=0.0 if decoupled else weight_decay,
        param_decay=1.0 - lr * weight_decay if decoupled else 1.0,
    )
    return in_dtype(dtype, named)


def step_coefficients(dtype, step, lr, betas):
    """`StepCoefficients`: ``−lr/(1 − β1ᵗ)`` and ``√(1 − β2ᵗ)``."""
    return in_dtype(dtype, _adam_step_values(step, lr, betas))


def step_coefficients_per_entry(dtype, steps, lr, betas):
    """`step_coefficients` for an array of step counts, as rows of an array: each
    distinct count computed once, in Python floats as ``torch.optim`` computes it."""
    first = float(steps[0])
    if (steps == first).all():  # the common case: every parameter at the same step
        return np.array([_adam_step_values(first, lr, betas)], dtype)
    counts, which = np.unique(steps, return_inverse=True)
    rows = [_adam_step_values(count, lr, betas) for count in counts.tolist()]
    return np.array(rows, dtype)[which]


def _adam_step_values(step, lr, betas):
    """`StepCoefficients` of step ``step``, in Python (or float32) floats."""
    beta1, beta2 = betas
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    if bias_correction1 == 0.0 or bias_correction2 < 0.0:
        # betas set outside [0, 1) after construction (torch checks them only there):
        # IEEE results, as torch's fused step gives, not an exception after some
        # buckets have stepped.
        with np.errstate(all="ignore"):
            step_size = np.float64(-lr) / np.float64(bias_correction1)
            return StepCoefficients(float(step_size), float(np.sqrt(np.float64(bias_correction2))))
    if not isinstance(bias_correction1, np.floating):
        return StepCoefficients(-lr / bias_correction1, bias_correction2**0.5)  # torch's
    # float32 betas (float32 tensors in torch): its tensor arithmetic, where a Python
    # number over a tensor is the tensor's reciprocal times the number
    if isinstance(lr, np.floating):
        step_size = lr / bias_correction1
    else:
        step_size = np.float32(1) / bias_correction1 * lr
    return StepCoefficients(-step_size, np.sqrt(bias_correction2))


# --- the low-level functions (`fastmomentum.kernels`) ---------------------------------


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One Adam step (Kingma & Ba), in place on ``param`` and the moment buffers.

    ``step`` is this step's count t ≥ 1 (1 on the first call). With ``g = ±grad``::

        p ← p·(1 − lr·λ)                            if decoupled_weight_decay (AdamW)
        g ← g + λ·p                                 otherwise (L2, Adam)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + ε)

    ``max_exp_avg_sq`` is required with ``amsgrad`` and ignored otherwise.
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    amsgrad, maximize, decoupled_weight_decay = as_flags(
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("max_exp_avg_sq is required when amsgrad=True")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "max_exp_avg_sq": max_exp_avg_sq if amsgrad else None,
        },
        stream,
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize)
    per_step = step_coefficients(dtype, step, lr, betas)
    table = one_entry(arrays, per_step)
    kernels.launch(table, SPEC, shared, (amsgrad,), **launch)


def adamw_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: Literal[True] = True,
    stream=None,
) -> None:
    """One AdamW step (Loshchilov & Hutter): `adam_step` with decoupled weight decay,
    ``p ← p·(1 − lr·λ)`` before the moment update, and ``weight_decay=1e-2`` by default.

    ``decoupled_weight_decay`` may only be True; Adam's L2 weight decay is
    ``adam_step(..., decoupled_weight_decay=False)``.
    """
    if not hyperparameters.as_flag("decoupled_weight_decay", decoupled_weight_decay):
        raise TypeError(
            "adamw_step always decouples weight decay; for Adam's L2 weight decay call "
            "adam_step(..., decoupled_weight_decay=False)"
        )
    adam_step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        stream=stream,
    )


def adam_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg_codes: np.ndarray,
    exp_avg_absmax: np.ndarray,
    exp_avg_sq_codes: np.ndarray,
    exp_avg_sq_absmax: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One `adam_step` (no AMSGrad) whose moments are block-wise 8-bit
    (`kernels.quantization`), in place on ``param`` and the four state arrays.

    Each block of 256 elements of ``exp_avg`` (``exp_avg_sq``) is kept as int8 (uint8)
    codes, of ``param``'s shape, and one float32 absmax; ``exp_avg_absmax`` and
    ``exp_avg_sq_absmax`` hold ``ceil(param.size / 256)`` values. The step decodes the
    moments, updates them and ``param`` in float32 as `adam_step` does, and encodes
    them on their blocks' new absmax. Zeros (codes and absmax) are a fresh state;
    `quantization.quantize` and `quantization.dequantize` convert to and from float32.
    ``param`` and ``grad``: float32, float16 or bfloat16.
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    maximize, decoupled_weight_decay = as_flags(
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg_codes": exp_avg_codes,
            "exp_avg_sq_codes": exp_avg_sq_codes,
            "exp_avg_absmax": exp_avg_absmax,
            "exp_avg_sq_absmax": exp_avg_sq_absmax,
        },
        stream,
        {
            "exp_avg_codes": "signed",
            "exp_avg_sq_codes": "unsigned",
            "exp_avg_absmax": "absmax",
            "exp_avg_sq_absmax": "absmax",
        },
    )
    dtype = np.dtype(np.float32)
    shared = coefficients(dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize)
    per_step = step_coefficients(dtype, step, lr, betas)
    param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax = arrays
    columns = [param, grad, exp_avg, exp_avg_sq, None, exp_avg_absmax, exp_avg_sq_absmax, None]
    table = one_entry(columns, per_step, codes=True)  # no max_exp_avg_sq
    kernels.launch(table, int8_blockwise(SPEC), shared, (False,), **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (
    adam_step,
    adamw_step,
    adam_8bit_step,
)
