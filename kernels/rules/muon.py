"""Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"),
as ``torch.optim.Muon`` computes it: the two element-wise passes of a step.

A step of a 2-D parameter ``p`` is three parts, of which the first and the last are
the rules here and the middle is matrix products (torch's, in bfloat16, between the
two launches; `fastmomentum.muon`)::

    MOMENTUM   B ← B + (1 − μ)·(g − B)                 (torch's lerp)
               U = g + μ·(B − g)  if nesterov, else  U = B
    (torch)    O = NS(U): U in bfloat16, divided by max(‖U‖_F, ε), then k iterations
               of X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ (on Xᵀ when rows > columns)
    APPLY      p ← p·(1 − lr·λ) − lr'·O                 (lr' = lr·√max(1, A/B) by
               default, 0.2·lr·√max(A, B) with ``adjust_lr_fn="match_rms_adamw"``)

``U`` and then ``O`` live in a scratch array laid out like the state, ``update`` in
both specs, which no state dict holds (torch makes a new tensor for each too). In
float32 and float64 both passes give torch's CPU numbers bit for bit: its lerp and its
``add_(alpha=…)`` are one multiply-add rounded once each (``vec::fmadd``, its scalar
remainder loops contracted too, measured), its ``mul_`` one rounded product, so the
rules use `common.fused_lerp` and `precision.fused_multiply_add`. 16-bit values are
rounded where torch's 16-bit tensors round them: with 16-bit state the Nesterov
``U`` is computed from ``B`` as stored (the flags of `MOMENTUM`); a 16-bit parameter
stored to nearest has ``p·(1 − lr·λ)`` rounded to its format before ``O`` is added
(the flags of `APPLY`; not for a float32 master copy, Kahan's ``p + c`` or stochastic
rounding, which keep that product in float32).

``capturable=True`` (`APPLY_ON_DEVICE`): the update pass reads each parameter's
``−lr'`` from a float64 array on the device, which the step computes there between the
passes from a live lr (`fastmomentum.muon`), and its decay from that lr (`live_apply`).

No 8-bit state: ``U`` must be stored in an array of its own, which the block-wise
loops (`specs.int8_blockwise`, codes for every state array) do not write. No low-level
function either: the middle part needs torch (`fastmomentum.kernels` imports without
it).
"""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from ..capturable import same_type
from ..hyperparameters import grad_factor, in_dtype
from ..precision import BFLOAT16_BITS, FLOAT16_BITS, fused_multiply_add
from ..specs import KernelSpec
from .common import fused_lerp
from .lamb import as_stored

#: ``adjust_lr_fn`` values torch accepts (``None`` is ``"original"``).
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class MomentumCoefficients(NamedTuple):
    """`momentum`'s coefficients."""

    momentum: float
    momentum_complement: float
    grad_factor: float


@register_jitable
def momentum(
    param,
    grad,
    momentum_buffer,
    update,
    momentum,
    momentum_complement,
    grad_factor,
    nesterov,
    bfloat16_state,
    float16_state,
):
    """``B ← lerp(B, g, 1 − μ)``; ``U = lerp(g, B, μ)`` with Nesterov, else ``B`` (``B``
    as stored, 16-bit state rounded); ``g`` times ``grad_factor`` (AMP's 1/scale).
    Returns ``(B, U)``; ``param`` and ``update`` (scratch) are not read."""
    grad = grad_factor * grad
    momentum_buffer = fused_lerp(momentum_buffer, grad, momentum_complement, momentum)
    stored = as_stored(momentum_buffer, bfloat16_state, float16_state)
    if nesterov:
        return momentum_buffer, fused_lerp(grad, stored, momentum, momentum_complement)
    return momentum_buffer, stored


@register_jitable
def live_momentum(scalars, lr, inverse_scale, settings):
    """`MomentumCoefficients` on the device (``capturable=True``, `kernels.capturable`),
    in float64 as `momentum_coefficients` computes them: no count (``scalars`` is
    ``()``), ``settings`` is `MomentumLiveSettings` (lr is not read)."""
    momentum = settings[0]
    return (momentum, 1.0 - momentum, inverse_scale), (), ()


class MomentumLiveSettings(NamedTuple):
    """What `live_momentum` takes from the host."""

    momentum: float


MOMENTUM = KernelSpec(
    "muon_momentum",
    momentum,
    ("momentum_buffer", "update"),
    MomentumCoefficients,
    flags=("nesterov", "bfloat16_state", "float16_state"),
    updates_param=False,
    live=live_momentum,
    live_settings=MomentumLiveSettings,
)


class ApplyCoefficients(NamedTuple):
    """`apply`'s coefficient every parameter shares: the decay factor ``1 − lr·λ``."""

    decay: float


class ApplyStepCoefficients(NamedTuple):
    """A parameter's ``−lr'`` (the adjusted learning rate of its shape, negated)."""

    neg_step_size: float


@register_jitable
def apply(param, grad, update, decay, neg_step_size, bfloat16_param, float16_param):
    """``p ← p·(1 − lr·λ) − lr'·O`` (``update`` holds ``O``; ``grad`` is not read), the
    product rounded to the parameter's 16-bit format first with the flags, as torch's
    ``mul_`` then ``add_`` round it."""
    decayed = as_stored(param * decay, bfloat16_param, float16_param)
    return fused_multiply_add(update, neg_step_size, decayed)


APPLY = KernelSpec(
    "muon_apply",
    apply,
    ("update",),
    ApplyCoefficients,
    ApplyStepCoefficients,
    flags=("bfloat16_param", "float16_param"),
    read_only=("update",),
    reads_grad=False,
)


@register_jitable
def live_apply(scalars, lr, inverse_scale, settings):
    """`ApplyCoefficients` on the device, in float64 as `apply_coefficients` computes
    them (``settings`` is `ApplyLiveSettings`); the entry's ``−lr'`` is read from the
    device (`step_from_device`), here a placeholder."""
    return (1.0 - lr * settings[0],), (0.0,), ()


class ApplyLiveSettings(NamedTuple):
    """What `live_apply` takes from the host."""

    weight_decay: float


@register_jitable
def step_from_device(values, steps, entry):
    """`ApplyStepCoefficients` of ``entry`` from ``steps`` (float64, one row per entry:
    its ``−lr'``, computed on the device from a live lr by `fastmomentum.muon`),
    rounded once to the table's dtype."""
    return (same_type(steps[entry, 0], values[0]),)


#: `APPLY` reading each parameter's ``−lr'`` from the device (``capturable=True``: lr
#: is a tensor there, and lr' is lr times the parameter's shape factor, in float64).
APPLY_ON_DEVICE = APPLY._replace(
    name="muon_apply_on_device",
    from_sums=step_from_device,
    live=live_apply,
    live_settings=ApplyLiveSettings,
)


def check(lr, momentum, weight_decay, adjust_lr_fn):
    """Raise ``ValueError`` for what ``torch.optim.Muon``'s constructor rejects, in its
    order, with its messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not 0.0 <= momentum:
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
    if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


def check_orthogonalization(ns_coefficients, ns_steps):
    """Raise ``ValueError`` for what torch's Newton–Schulz iteration rejects at a step
    (its messages; here before anything of the step changes)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch's ``lr'`` of a parameter of ``shape`` (``A × B``): ``lr·√max(1, A/B)``
    (``None``, ``"original"``), ``0.2·lr·√max(A, B)`` (``"match_rms_adamw"``)."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / columns))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, columns))
    else:
        ratio = 1.0
    return lr * ratio


def momentum_coefficients(dtype, momentum, grad_scale=None):
    """`MomentumCoefficients` in ``dtype``."""
    named = MomentumCoefficients(
        momentum=momentum,
        momentum_complement=1.0 - momentum,
        grad_factor=grad_factor(False, grad_scale),
    )
    return in_dtype(dtype, named)


def apply_coefficients(dtype, lr, weight_decay):
    """`ApplyCoefficients` in ``dtype``."""
    return in_dtype(dtype, ApplyCoefficients(decay=1.0 - lr * weight_decay))


def rounded_to(value_format):
    """The 16-bit flags (bfloat16, float16) of an array of ``value_format`` (the type of
    its elements in a launch table, `kernels.tables`)."""
    kind = np.dtype(value_format)
    return kind == np.dtype(BFLOAT16_BITS), kind == np.dtype(FLOAT16_BITS)


def momentum_live_settings(momentum):
    """`MomentumLiveSettings`, as the plain tuple of floats kernels take."""
    return (float(momentum),)


def apply_live_settings(weight_decay):
    """`ApplyLiveSettings`, as the plain tuple of floats kernels take."""
    return (float(weight_decay),)


def adjusted_lr_factor(adjust_lr_fn, shape):
    """``lr' / lr`` for a parameter of ``shape`` (`adjusted_lr` of lr 1)."""
    return adjusted_lr(1.0, adjust_lr_fn, shape)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (MOMENTUM, APPLY)
#: Only the CUDA kernels launch it (`rules.DEVICE_SPECS`).
DEVICE_SPECS = (APPLY_ON_DEVICE,)

#: No low-level function: Newton–Schulz needs torch (see the module doc).
FUNCTIONS = ()
