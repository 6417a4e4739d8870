"""SGD: plain, and with heavy-ball or Nesterov momentum in either convention.

Each rule with its named coefficients (``NamedTuple``, in the rule's argument order
after the per-element values), its `specs.KernelSpec`, the checks torch.optim makes of its
hyperparameters (``ValueError``, torch's messages) and its coefficients built from them.
"""

from typing import Literal, NamedTuple

import numpy as np
from numba.extending import register_jitable

from ..calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers
from ..hyperparameters import check_finite, check_non_negative, grad_factor, in_dtype
from ..specs import SIGNED, KernelSpec, int8_blockwise
from .common import descent_direction

#: The momentum conventions: torch's (lr applied at the update) and lr folded into the
#: velocity (Polyak, Sutskever et al., Keras).
CONVENTIONS = ("pytorch", "lr_folded")


class PlainCoefficients(NamedTuple):
    """`plain`'s coefficients."""

    lr: float
    grad_factor: float
    weight_decay: float


@register_jitable
def plain(param, grad, lr, grad_factor, weight_decay):
    """SGD without momentum: ``p ← p − lr·d``."""
    return param - lr * descent_direction(param, grad, grad_factor, weight_decay)


@register_jitable
def live_plain(scalars, lr, inverse_scale, settings):
    """`PlainCoefficients` of the next step on the device (``capturable=True``,
    `kernels.capturable`), in float64 as `plain_coefficients` computes them: SGD keeps
    no count, so ``scalars`` is ``()``; ``settings`` is `live_settings`."""
    weight_decay, sign = settings[2], settings[3]
    return (lr, sign * inverse_scale, weight_decay), (), ()


class LiveSettings(NamedTuple):
    """What `live_plain` and `live_momentum` take from the host: every hyperparameter
    but lr."""

    momentum: float
    dampening: float
    weight_decay: float
    sign: float  # −1.0 with ``maximize``, else 1.0
    lr_folded: float  # 1.0 in the lr-folded convention, else 0.0


def live_settings(momentum, dampening, weight_decay, maximize, momentum_convention):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    sign = -1.0 if maximize else 1.0
    lr_folded = 1.0 if momentum_convention == "lr_folded" else 0.0
    values = LiveSettings(momentum, dampening, weight_decay, sign, lr_folded)
    return tuple(float(value) for value in values)


PLAIN = KernelSpec(
    "sgd_plain", plain, (), PlainCoefficients, live=live_plain, live_settings=LiveSettings
)


class MomentumCoefficients(NamedTuple):
    """`momentum`'s coefficients (``nesterov`` and ``first_step`` are flags)."""

    momentum: float
    dampening_complement: float
    grad_factor: float
    weight_decay: float
    velocity_scale: float
    update_scale: float


@register_jitable
def momentum(
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
    return _momentum(
        param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
        velocity_scale, update_scale, nesterov, first_step, False,
    )  # fmt: skip


@register_jitable
def blockwise_momentum(
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
    """`momentum` as the 8-bit loops compute it (`specs.KernelSpec.blockwise_rule`): with no
    test of λ inside the loop (`common.descent_direction` unbranched)."""
    return _momentum(
        param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
        velocity_scale, update_scale, nesterov, first_step, True,
    )  # fmt: skip


@register_jitable
def _momentum(
    param, grad, velocity, momentum, dampening_complement, grad_factor, weight_decay,
    velocity_scale, update_scale, nesterov, first_step, unbranched,
):  # fmt: skip
    """`momentum`, or `blockwise_momentum` with ``unbranched`` (a constant where compiled)."""
    direction = velocity_scale * descent_direction(
        param, grad, grad_factor, weight_decay, unbranched
    )
    if first_step:
        velocity = direction
    else:
        velocity = momentum * velocity + dampening_complement * direction
    if nesterov:
        step = direction + momentum * velocity
    else:
        step = velocity
    return param - update_scale * step, velocity


@register_jitable
def live_momentum(scalars, lr, inverse_scale, settings):
    """`MomentumCoefficients` of the next step on the device (``capturable=True``,
    `kernels.capturable`), in float64 as `momentum_coefficients` computes them;
    ``first_step`` stays the launch table's (`KernelSpec.live_entry_flags`): the host
    knows which buffers it made. ``scalars`` is ``()``, ``settings`` `live_settings`."""
    momentum, dampening, weight_decay, sign, lr_folded = settings
    velocity_scale, update_scale = (lr, 1.0) if lr_folded != 0.0 else (1.0, lr)
    shared = (
        momentum, 1.0 - dampening, sign * inverse_scale, weight_decay, velocity_scale, update_scale
    )  # fmt: skip
    return shared, (), ()


MOMENTUM = KernelSpec(
    "sgd_momentum",
    momentum,
    ("momentum_buffer",),
    MomentumCoefficients,
    flags=("nesterov",),
    entry_flags=("first_step",),
    blockwise_rule=blockwise_momentum,
    codes=(("momentum_buffer", SIGNED),),
    live=live_momentum,
    live_settings=LiveSettings,
    live_entry_flags=False,
)


def check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention):
    """Raise ``ValueError`` for SGD settings that ``torch.optim.SGD`` rejects (or we do)."""
    check_non_negative("learning rate", lr)
    check_non_negative("momentum value", momentum)
    check_non_negative("weight_decay value", weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_finite("dampening value", dampening)
    check_convention(momentum_convention)


def check_convention(momentum_convention):
    """Raise ``ValueError`` unless ``momentum_convention`` is one we implement."""
    if momentum_convention not in CONVENTIONS:
        raise ValueError(
            f"Invalid momentum_convention: {momentum_convention!r}; expected one of {CONVENTIONS}"
        )


def plain_coefficients(dtype, lr, weight_decay, maximize, grad_scale=None):
    """`PlainCoefficients` ."""
    named = PlainCoefficients(
        lr=lr, grad_factor=grad_factor(maximize, grad_scale), weight_decay=weight_decay
    )
    return in_dtype(dtype, named)


def momentum_coefficients(
    dtype, lr, momentum, dampening, weight_decay, maximize, momentum_convention, grad_scale=None
):
    """`MomentumCoefficients`: the velocity carries lr in the lr-folded
    convention, the update applies it in PyTorch's."""
    lr_folded = momentum_convention == "lr_folded"
    named = MomentumCoefficients(
        momentum=momentum,
        dampening_complement=1.0 - dampening,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
        velocity_scale=lr if lr_folded else 1.0,
        update_scale=1.0 if lr_folded else lr,
    )
    return in_dtype(dtype, named)


# --- the low-level functions (`fastmomentum.kernels`) ---------------------------------


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One SGD step, in place on ``param`` (and ``momentum_buffer`` when momentum > 0).

    With ``d = ±g + λ·p`` (minus when ``maximize``), in PyTorch's convention::

        v ← d on the first step, else μ·v + (1 − τ)·d
        p ← p − lr·(d + μ·v)   (nesterov)   or   p ← p − lr·v

    and in the lr-folded convention (Polyak, Sutskever et al., Keras)::

        v ← lr·d on the first step, else μ·v + (1 − τ)·lr·d
        p ← p − (lr·d + μ·v)   (nesterov)   or   p ← p − v

    ``first_step=True`` initialises the buffer from ``d`` (torch's first step); with
    ``False`` the buffer's current contents are used. ``momentum_buffer`` is required when
    ``momentum > 0`` and ignored otherwise. The arrays are NumPy arrays (plain
    ``np.ndarray`` or ``np.memmap``) or GPU arrays, C-contiguous, of one shape and one
    float dtype, not overlapping; those updated in place must be writeable.

    Example::

        >>> p, g, v = np.ones(3, np.float32), np.full(3, 0.5, np.float32), np.zeros(3, np.float32)
        >>> sgd_step(p, g, v, lr=0.1, momentum=0.9, first_step=True)
        >>> p
        array([0.95, 0.95, 0.95], dtype=float32)
    """
    lr, momentum, dampening, weight_decay = real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = as_flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        kernels, arrays, launch = dispatch({"param": param, "grad": grad}, stream)
        shared = plain_coefficients(compute_dtype(arrays), lr, weight_decay, maximize)
        kernels.launch(one_entry(arrays), PLAIN, shared, **launch)
        return
    if momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "momentum_buffer": momentum_buffer}, stream
    )
    shared = momentum_coefficients(
        compute_dtype(arrays), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = one_entry(arrays, [1.0 if first_step else 0.0])
    kernels.launch(table, MOMENTUM, shared, (nesterov,), **launch)


def sgd_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer_codes: np.ndarray,
    momentum_buffer_absmax: np.ndarray,
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One `sgd_step` with momentum whose buffer is block-wise 8-bit: int8 codes of
    ``param``'s shape and one float32 absmax per block of 256 elements (see
    `adam_8bit_step`). ``momentum`` must be positive."""
    lr, momentum, dampening, weight_decay = real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = as_flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        raise ValueError("sgd_8bit_step needs momentum > 0 (without it there is no buffer)")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "momentum_buffer_codes": momentum_buffer_codes,
            "momentum_buffer_absmax": momentum_buffer_absmax,
        },
        stream,
        {"momentum_buffer_codes": "signed", "momentum_buffer_absmax": "absmax"},
    )
    shared = momentum_coefficients(
        np.dtype(np.float32), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = one_entry(arrays, [1.0 if first_step else 0.0], codes=True)
    kernels.launch(table, int8_blockwise(MOMENTUM), shared, (nesterov,), **launch)


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (PLAIN, MOMENTUM)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (
    sgd_step,
    sgd_8bit_step,
)
