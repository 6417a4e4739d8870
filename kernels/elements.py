"""One element of a step, read from and written back to memory: the rules of
`kernels.rules` applied at index ``i`` of the step's arrays.

The CPU loops and the CUDA kernels differ only in which indices a thread takes; each
calls these for every index it takes. The arrays are whatever indexes elements: typed
pointers (`kernels.pointers`) in compiled code, NumPy views in the CUDA simulator.
Elements are read as the coefficients' type and written back in their own format
(`kernels.precision`: bfloat16 and float16 arrays compute in float32, one rounding per
stored value). With ``clear_grad`` the gradient element is zeroed once read (zero is
all-zero bits in every format), in the same pass as the update. With ``mirrored`` the
param array is a float32 master copy and each new value is also stored, rounded, into
``mirror`` (the 16-bit parameter itself: master weights). Block-wise 8-bit state
(`kernels.quantization`) is decoded here and returned, not stored: its codes need the
new absmax of their whole block.
"""

from numba.extending import register_jitable

from . import rules
from .precision import load, store
from .quantization import decode_signed, decode_unsigned


@register_jitable
def _store_param(param, mirror, i, value, mirrored):
    store(param, i, value)
    if mirrored:
        store(mirror, i, value)


@register_jitable
def sgd_plain_at(i, param, grad, coefficients, clear_grad, mirror, mirrored):
    like = coefficients[0]
    new_param = rules.sgd_plain(load(param, i, like), load(grad, i, like), *coefficients)
    _store_param(param, mirror, i, new_param, mirrored)
    if clear_grad:
        grad[i] = 0


@register_jitable
def sgd_momentum_at(
    i, param, grad, velocity, coefficients, nesterov, first_step, clear_grad, mirror, mirrored
):
    like = coefficients[0]
    new_param, new_velocity = rules.sgd_momentum(
        load(param, i, like),
        load(grad, i, like),
        load(velocity, i, like),
        *coefficients,
        nesterov,
        first_step,
    )
    _store_param(param, mirror, i, new_param, mirrored)
    store(velocity, i, new_velocity)
    if clear_grad:
        grad[i] = 0


@register_jitable
def adam_at(
    i,
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    coefficients,
    entry,
    amsgrad,
    clear_grad,
    mirror,
    mirrored,
):
    """``entry``: the entry's ``(−lr/(1 − β1ᵗ), √(1 − β2ᵗ))``; ``max_exp_avg_sq`` is
    read and written only with ``amsgrad``."""
    like = coefficients[0]
    running_max = load(max_exp_avg_sq, i, like) if amsgrad else load(exp_avg_sq, i, like)
    new_param, new_exp_avg, new_exp_avg_sq, running_max = rules.adam(
        load(param, i, like),
        load(grad, i, like),
        load(exp_avg, i, like),
        load(exp_avg_sq, i, like),
        running_max,
        *coefficients,
        entry[0],
        entry[1],
        amsgrad,
    )
    _store_param(param, mirror, i, new_param, mirrored)
    store(exp_avg, i, new_exp_avg)
    store(exp_avg_sq, i, new_exp_avg_sq)
    if amsgrad:
        store(max_exp_avg_sq, i, running_max)
    if clear_grad:
        grad[i] = 0


@register_jitable
def adam_blockwise_at(
    i, param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, coefficients,
    entry, clear_grad,
):  # fmt: skip
    """`adam_at` with 8-bit ``exp_avg`` and ``exp_avg_sq`` codes (`kernels.quantization`)
    of blocks with these absmax: stores the new param and returns the new
    ``(exp_avg, exp_avg_sq)`` for the caller to encode."""
    like = coefficients[0]
    second_moment = decode_unsigned(exp_avg_sq[i], exp_avg_sq_absmax)
    new_param, new_exp_avg, new_exp_avg_sq, _ = rules.adam(
        load(param, i, like),
        load(grad, i, like),
        decode_signed(exp_avg[i], exp_avg_absmax),
        second_moment,
        second_moment,
        *coefficients,
        entry[0],
        entry[1],
        False,
    )
    store(param, i, new_param)
    if clear_grad:
        grad[i] = 0
    return new_exp_avg, new_exp_avg_sq


@register_jitable
def sgd_momentum_blockwise_at(
    i, param, grad, velocity, velocity_absmax, coefficients, nesterov, first_step, clear_grad
):
    """`sgd_momentum_at` with an 8-bit momentum buffer (`kernels.quantization`) of a
    block with this absmax: stores the new param and returns the new buffer value for
    the caller to encode."""
    like = coefficients[0]
    new_param, new_velocity = rules.sgd_momentum(
        load(param, i, like),
        load(grad, i, like),
        decode_signed(velocity[i], velocity_absmax),
        *coefficients,
        nesterov,
        first_step,
    )
    store(param, i, new_param)
    if clear_grad:
        grad[i] = 0
    return new_velocity
