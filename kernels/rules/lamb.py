"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Algorithm 2).

A step is two launches over a bucket: `DIRECTION` updates the moments, writes each
element's Adam direction with decoupled weight decay into a scratch array ``update``,
and sums each tensor's ``‖p‖²`` and ``‖u‖²`` in the same pass (a segmented reduction:
per segment in the loop, per tensor on the host; `steps.Step.squares`); `APPLY` moves
each tensor by its own trust ratio::

    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    u = (m / c1) / (√(v / c2) + ε) + λ·p     (c1 = 1 − β1ᵗ, c2 = 1 − β2ᵗ; both 1 without
                                              bias correction)
    r = ‖p‖ / ‖u‖, or 1 when either norm is 0
    p ← p − lr·r·u

The variant: the paper's, with bias correction on by default (Algorithm 2 has it), the
trust ratio applied to every tensor (Apex's FusedLAMB skips it for tensors without
weight decay unless ``use_nvlamb``; DeepSpeed's clamps it to [0.01, 10]), no
clipping of the ratio, and no global gradient clipping inside the step (Apex clips by
``max_grad_norm=1.0`` by default; here call ``clip_grad_norm_`` first).
"""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from ..hyperparameters import grad_factor, in_dtype
from ..steps import Step
from . import adam
from .common import lerp


class Coefficients(NamedTuple):
    """`direction`'s coefficients every parameter shares."""

    beta1: float
    beta1_complement: float
    beta2: float
    beta2_complement: float
    eps: float
    grad_factor: float
    weight_decay: float


class StepCoefficients(NamedTuple):
    """A parameter's bias corrections at its step ``t`` (1 without bias correction)."""

    bias_correction1: float
    bias_correction2: float


@register_jitable
def direction(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    update,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    eps,
    grad_factor,
    weight_decay,
    bias_correction1,
    bias_correction2,
):
    """The moments and the update direction ``u`` of one element (see the module doc);
    returns ``(m, v, u)``, the parameter unchanged."""
    grad = grad_factor * grad
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    denom = math.sqrt(exp_avg_sq / bias_correction2) + eps
    update = (exp_avg / bias_correction1) / denom + weight_decay * param
    return exp_avg, exp_avg_sq, update


DIRECTION = Step(
    "lamb_direction",
    direction,
    ("exp_avg", "exp_avg_sq", "update"),
    Coefficients,
    StepCoefficients,
    # reassociation lets the float64 sums of squares vectorise
    fastmath=frozenset({"reassoc", "nsz"}),
    updates_param=False,
    squares=("param", "update"),
)


class ApplyCoefficients(NamedTuple):
    """`apply`'s coefficients: none shared (``like`` only gives the dtype)."""

    like: float


class ApplyStepCoefficients(NamedTuple):
    """A tensor's ``−lr·r``."""

    neg_step_size: float


@register_jitable
def apply(param, grad, update, like, neg_step_size):
    """``p ← p − lr·r·u`` (``neg_step_size`` is ``−lr·r``)."""
    return param + neg_step_size * update


APPLY = Step(
    "lamb_apply",
    apply,
    ("update",),
    ApplyCoefficients,
    ApplyStepCoefficients,
    read_only=("update",),
)


def apply_coefficients(dtype):
    """`ApplyCoefficients` in ``dtype``."""
    return in_dtype(dtype, ApplyCoefficients(like=0.0))


def check(lr, betas, eps, weight_decay):
    """Raise ``ValueError`` for invalid LAMB settings (Adam's messages)."""
    adam.check(lr, betas, eps, weight_decay)


def coefficients(dtype, betas, eps, weight_decay, maximize, grad_scale=None):
    """`Coefficients` in ``dtype``."""
    beta1, beta2 = betas
    named = Coefficients(
        beta1=beta1,
        beta1_complement=1.0 - beta1,
        beta2=beta2,
        beta2_complement=1.0 - beta2,
        eps=eps,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
    )
    return in_dtype(dtype, named)


def bias_corrections(dtype, steps, betas, bias_correction):
    """Rows of `StepCoefficients` for parameters at steps ``steps`` (≥ 1)."""
    steps = np.asarray(steps, np.float64).reshape(-1)
    if not bias_correction:
        return np.ones((steps.size, 2), dtype)
    beta1, beta2 = betas
    return np.stack([1.0 - beta1**steps, 1.0 - beta2**steps], axis=1).astype(dtype)


def trust_step_sizes(dtype, squared_norms, lr):
    """Rows of `ApplyStepCoefficients` from each tensor's ``(‖p‖², ‖u‖²)``: ``−lr·r``
    with ``r = ‖p‖/‖u‖``, or ``−lr`` when either norm is 0."""
    param_norm, update_norm = np.sqrt(squared_norms[:, 0]), np.sqrt(squared_norms[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, 1.0)
    return (-lr * ratio).astype(dtype).reshape(-1, 1)
