"""Hyperparameter checks and their conversion into kernel coefficients.

The checks raise ``ValueError`` with the messages ``torch.optim`` uses, so the torch
optimizers and the low-level API reject the same inputs the same way. The low-level API
first takes its arguments through ``as_real``, ``as_flag``, ``as_betas`` and ``as_step``,
which raise ``TypeError`` naming an argument of the wrong type. The coefficient tuples
are what the kernels take: every scalar already in the arrays' dtype (a float64 scalar
would silently turn float32 arithmetic into float64), derived quantities such as
``1 − τ`` or ``−lr/(1 − β1ᵗ)`` computed once here in double precision, as torch does.
Each is built by name as its rule's ``NamedTuple`` (`kernels.rules`), then handed over
as a plain tuple (`in_dtype`).
"""

import math
import numbers

import numpy as np

from .rules import (
    AdamCoefficients,
    AdamStepCoefficients,
    SgdMomentumCoefficients,
    SgdPlainCoefficients,
)

MOMENTUM_CONVENTIONS = ("pytorch", "lr_folded")


def as_real(name, value):
    """``value`` as a Python float; ``TypeError`` unless it is a real number.

    Python and NumPy ints and floats are real numbers; ``bool`` is not (a flag passed
    where a number belongs), nor are strings or arrays.
    """
    if type(value) is float:  # the common case
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def as_flag(name, value):
    """``value`` as a Python bool; ``TypeError`` unless it is a ``bool`` or ``np.bool_``
    (a string such as ``"False"`` would otherwise count as true)."""
    if value is True or value is False:  # the common case
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def as_betas(betas):
    """``(β1, β2)`` as Python floats: ``TypeError`` unless a tuple or list of real
    numbers, ``ValueError`` unless it has two."""
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair of real numbers, got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(as_real(f"betas[{index}]", beta) for index, beta in enumerate(betas))


def as_step(step):
    """A step count t as a float: ``TypeError`` unless a real number, ``ValueError``
    unless a whole number ≥ 1."""
    count = as_real("step", step)
    if not (count.is_integer() and count >= 1):
        raise ValueError(f"Invalid step: {step}; the first step is 1")
    return count


def check_sgd(lr, momentum, dampening, weight_decay, nesterov, momentum_convention):
    """Raise ``ValueError`` for SGD settings that ``torch.optim.SGD`` rejects (or we do)."""
    _check_non_negative("learning rate", lr)
    _check_non_negative("momentum value", momentum)
    _check_non_negative("weight_decay value", weight_decay)
    _check_finite("dampening value", dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_momentum_convention(momentum_convention)


def check_momentum_convention(momentum_convention):
    """Raise ``ValueError`` unless ``momentum_convention`` is one we implement."""
    if momentum_convention not in MOMENTUM_CONVENTIONS:
        raise ValueError(
            f"Invalid momentum_convention: {momentum_convention!r}; "
            f"expected one of {MOMENTUM_CONVENTIONS}"
        )


def check_adam(lr, betas, eps, weight_decay):
    """Raise ``ValueError`` for Adam settings that ``torch.optim.Adam`` rejects."""
    _check_non_negative("learning rate", lr)
    _check_non_negative("epsilon value", eps)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    _check_non_negative("weight_decay value", weight_decay)


def grad_factor(maximize, grad_scale=None):
    """What the rules multiply a gradient by: ±1, and ``1/scale`` to undo AMP's loss scale.

    GradScaler's scales are powers of two, so the product is exact and equals unscaling
    the gradient first, as ``GradScaler.unscale_`` does.
    """
    sign = -1.0 if maximize else 1.0
    return sign if grad_scale is None else sign / float(grad_scale)


def sgd_plain_coefficients(dtype, lr, weight_decay, maximize, grad_scale=None):
    """`rules.SgdPlainCoefficients` for `kernels.cpu.sgd_plain`."""
    named = SgdPlainCoefficients(
        lr=lr, grad_factor=grad_factor(maximize, grad_scale), weight_decay=weight_decay
    )
    return in_dtype(dtype, named)


def sgd_momentum_coefficients(
    dtype, lr, momentum, dampening, weight_decay, maximize, momentum_convention, grad_scale=None
):
    """`rules.SgdMomentumCoefficients`: the velocity carries lr in the lr-folded
    convention, the update applies it in PyTorch's."""
    lr_folded = momentum_convention == "lr_folded"
    named = SgdMomentumCoefficients(
        momentum=momentum,
        dampening_complement=1.0 - dampening,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
        velocity_scale=lr if lr_folded else 1.0,
        update_scale=1.0 if lr_folded else lr,
    )
    return in_dtype(dtype, named)


def adam_constant_coefficients(
    dtype, lr, betas, eps, weight_decay, decoupled, maximize, grad_scale=None
):
    """`rules.AdamCoefficients`: those of `rules.adam` that do not change with the step."""
    beta1, beta2 = betas
    named = AdamCoefficients(
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


def adam_step_coefficients(dtype, step, lr, betas):
    """`rules.AdamStepCoefficients`: ``−lr/(1 − β1ᵗ)`` and ``√(1 − β2ᵗ)``."""
    return in_dtype(dtype, _adam_step_values(step, lr, betas))


def adam_step_coefficients_per_entry(dtype, steps, lr, betas):
    """`adam_step_coefficients` for an array of step counts, as rows of an array: each
    distinct count computed once, in Python floats as ``torch.optim`` computes it."""
    first = float(steps[0])
    if (steps == first).all():  # the common case: every parameter at the same step
        return np.array([_adam_step_values(first, lr, betas)], dtype)
    counts, which = np.unique(steps, return_inverse=True)
    rows = [_adam_step_values(count, lr, betas) for count in counts.tolist()]
    return np.array(rows, dtype)[which]


def _adam_step_values(step, lr, betas):
    """`rules.AdamStepCoefficients` of step ``step``, in Python (or float32) floats."""
    beta1, beta2 = betas
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    if bias_correction1 == 0.0 or bias_correction2 < 0.0:
        # betas set outside [0, 1) after construction (torch checks them only there):
        # IEEE results, as torch's fused step gives, not an exception after some
        # buckets have stepped.
        with np.errstate(all="ignore"):
            step_size = np.float64(-lr) / np.float64(bias_correction1)
            return AdamStepCoefficients(
                float(step_size), float(np.sqrt(np.float64(bias_correction2)))
            )
    if not isinstance(bias_correction1, np.floating):
        return AdamStepCoefficients(-lr / bias_correction1, bias_correction2**0.5)  # torch's
    # float32 betas (float32 tensors in torch): its tensor arithmetic, where a Python
    # number over a tensor is the tensor's reciprocal times the number
    if isinstance(lr, np.floating):
        step_size = lr / bias_correction1
    else:
        step_size = np.float32(1) / bias_correction1 * lr
    return AdamStepCoefficients(-step_size, np.sqrt(bias_correction2))


def in_dtype(dtype, coefficients):
    """A rule's named coefficients as the plain tuple of ``dtype`` scalars kernels take.

    One array conversion, then its scalars: ≈1 µs, a third of converting one by one.
    """
    return tuple(np.array(coefficients, dtype=dtype))


def _check_non_negative(name, value):
    if not value >= 0.0:  # written so that NaN fails too
        raise ValueError(f"Invalid {name}: {value}")


def _check_finite(name, value):
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
