"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of
an interpolation of momentum and gradient, one momentum state.

The paper's update with the defaults of its widely used implementation (lucidrains'
lion-pytorch: ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0``), decoupled weight
decay first as there. torch has no Lion; the tests hold this rule to a float64
reference (tests/reference.py). One difference from lion-pytorch, on purpose: a NaN
propagates (``sign(NaN)`` is NaN, as NumPy's), where ``torch.sign`` gives 0 and leaves
the parameter still, its momentum NaN, at every later step.
"""

from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_non_negative, grad_factor, in_dtype
from ..specs import SIGNED, KernelSpec


class Coefficients(NamedTuple):
    """`update`'s coefficients."""

    beta1: float
    beta1_complement: float
    beta2: float
    beta2_complement: float
    grad_factor: float
    param_decay: float
    lr: float


@register_jitable
def signed(magnitude, value):
    """``magnitude·sign(value)`` for ``magnitude ≥ 0``: ``±magnitude``, and ``value``
    itself where it is ±0 (``sign(0) = 0``, as torch's) or NaN (kept, unlike torch's
    ``sign``, which gives 0). Two selects, no multiply and no constant."""
    if value > 0:
        return magnitude
    if value < 0:
        return -magnitude
    return value


@register_jitable
def update(
    param,
    grad,
    exp_avg,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    grad_factor,
    param_decay,
    lr,
):
    """Lion for one element, with ``g = ±grad``::

        p ← p·(1 − lr·λ)                       (param_decay)
        u = sign(β1·m + (1 − β1)·g)            (sign(0) = 0)
        p ← p − lr·u
        m ← β2·m + (1 − β2)·g

    Returns ``(param, m)``.
    """
    grad = grad_factor * grad
    param = param * param_decay
    param = param - signed(lr, beta1 * exp_avg + beta1_complement * grad)
    exp_avg = beta2 * exp_avg + beta2_complement * grad
    return param, exp_avg


@register_jitable
def live_coefficients(scalars, lr, inverse_scale, settings):
    """`Coefficients` of the next step on the device (``capturable=True``,
    `kernels.capturable`), in float64 as `coefficients` computes them: Lion keeps no
    count, so ``scalars`` is ``()``; ``settings`` is `live_settings`."""
    beta1, beta2, weight_decay, sign = settings
    shared = (
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, sign * inverse_scale, 1.0 - lr * weight_decay, lr
    )  # fmt: skip
    return shared, (), ()


class LiveSettings(NamedTuple):
    """What `live_coefficients` takes from the host: every hyperparameter but lr."""

    beta1: float
    beta2: float
    weight_decay: float
    sign: float  # −1.0 with ``maximize``, else 1.0


def live_settings(betas, weight_decay, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    sign = -1.0 if maximize else 1.0
    return tuple(float(value) for value in LiveSettings(*betas, weight_decay, sign))


SPEC = KernelSpec(
    "lion",
    update,
    ("exp_avg",),
    Coefficients,
    codes=(("exp_avg", SIGNED),),
    live=live_coefficients,
    live_settings=LiveSettings,
)


def check(lr, betas, weight_decay):
    """Raise ``ValueError`` for Lion settings torch's optimizers would reject, with their
    messages: ``lr ≥ 0``, ``0 ≤ β < 1``, ``λ ≥ 0`` (torch has no Lion; lion-pytorch
    asserts ``lr > 0`` and ``0 ≤ β ≤ 1``)."""
    check_non_negative("learning rate", lr)
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")
    check_non_negative("weight_decay value", weight_decay)


def coefficients(dtype, lr, betas, weight_decay, maximize, grad_scale=None):
    """`Coefficients`; ``1 − β`` and ``1 − lr·λ`` in double precision, as lion-pytorch
    computes them in Python floats."""
    beta1, beta2 = betas
    named = Coefficients(
        beta1=beta1,
        beta1_complement=1.0 - beta1,
        beta2=beta2,
        beta2_complement=1.0 - beta2,
        grad_factor=grad_factor(maximize, grad_scale),
        param_decay=1.0 - lr * weight_decay,
        lr=lr,
    )
    return in_dtype(dtype, named)


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def lion_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    maximize: bool = False,
    stream=None,
) -> None:
    """One Lion step (Chen et al., 2023), in place on ``param`` and ``exp_avg``.

    With ``g = ±grad`` (minus when ``maximize``)::

        p ← p·(1 − lr·λ)
        u = sign(β1·m + (1 − β1)·g)        (sign(0) = 0; a NaN propagates)
        p ← p − lr·u
        m ← β2·m + (1 − β2)·g

    ``exp_avg`` starts at zero. Arrays as for `sgd_step`.

    Example::

        >>> p, m = np.ones(3, np.float32), np.zeros(3, np.float32)
        >>> lion_step(p, np.array([0.5, 0, -2], np.float32), m, lr=0.1)
        >>> p
        array([0.9, 1. , 1.1], dtype=float32)
    """
    lr, weight_decay = real_numbers(lr=lr, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    (maximize,) = as_flags(maximize=maximize)
    check(lr, betas, weight_decay)
    kernels, arrays, launch = dispatch({"param": param, "grad": grad, "exp_avg": exp_avg}, stream)
    shared = coefficients(compute_dtype(arrays), lr, betas, weight_decay, maximize)
    kernels.launch(one_entry(arrays), SPEC, shared, **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (SPEC,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (lion_step,)
