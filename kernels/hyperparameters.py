"""What every rule's hyperparameters go through: type checks, value checks, and the
conversion of its named coefficients into what kernels take.

The low-level API first takes its arguments through ``as_real``, ``as_flag``,
``as_betas`` and ``as_step``, which raise ``TypeError`` naming an argument of the wrong
type. Each rule's module (`kernels.rules`) checks its values with ``ValueError`` and
torch.optim's messages (``check_non_negative``, ``check_finite``), and builds its
coefficients by name, derived quantities such as ``1 − τ`` or ``−lr/(1 − β1ᵗ)``
computed once in double precision, as torch does; ``in_dtype`` hands them over as a
plain tuple, every scalar in the arrays' dtype (a float64 scalar would silently turn
float32 arithmetic into float64).
"""

import math
import numbers

import numpy as np


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


def grad_factor(maximize, grad_scale=None):
    """What the rules multiply a gradient by: ±1, and ``1/scale`` to undo AMP's loss scale.

    GradScaler's scales are powers of two, so the product is exact and equals unscaling
    the gradient first, as ``GradScaler.unscale_`` does.
    """
    sign = -1.0 if maximize else 1.0
    return sign if grad_scale is None else sign / float(grad_scale)


def in_dtype(dtype, coefficients):
    """A rule's named coefficients as the plain tuple of ``dtype`` scalars kernels take.

    One array conversion, then its scalars: ≈1 µs, a third of converting one by one.
    """
    return tuple(np.array(coefficients, dtype=dtype))


def check_non_negative(name, value):
    """``ValueError`` (torch's message, ``Invalid <name>: <value>``) unless ``value ≥ 0``."""
    if not value >= 0.0:  # written so that NaN fails too
        raise ValueError(f"Invalid {name}: {value}")


def check_finite(name, value):
    """``ValueError`` (torch's message) unless ``value`` is finite."""
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value}")
