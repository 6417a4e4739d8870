"""One element of a step, read from and written back to memory: the rules of
`kernels.rules` applied at index ``i`` of the step's arrays.

The CPU loops and the CUDA kernels differ only in which indices a thread takes; each
calls these for every index it takes. The arrays are whatever indexes elements: typed
pointers (`kernels.pointers`) in compiled code, NumPy views in the CUDA simulator.
Elements are read as the coefficients' type and written back in their own format
(`kernels.precision`: bfloat16 and float16 arrays compute in float32, one rounding per
stored value). With ``clear_grad`` the gradient element is zeroed once read (zero is
all-zero bits in every format), in the same pass as the update.
"""

from numba.extending import register_jitable

from . import rules
from .precision import load, store


@register_jitable
def sgd_plain_at(i, param, grad, coefficients, clear_grad):
    like = coefficients[0]
    store(param, i, rules.sgd_plain(load(param, i, like), load(grad, i, like), *coefficients))
    if clear_grad:
        grad[i] = 0


@register_jitable
def sgd_momentum_at(i, param, grad, velocity, coefficients, nesterov, first_step, clear_grad):
    like = coefficients[0]
    new_param, new_velocity = rules.sgd_momentum(
        load(param, i, like),
        load(grad, i, like),
        load(velocity, i, like),
        *coefficients,
        nesterov,
        first_step,
    )
    store(param, i, new_param)
    store(velocity, i, new_velocity)
    if clear_grad:
        grad[i] = 0


@register_jitable
def adam_at(
    i, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, entry, amsgrad, clear_grad
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
    store(param, i, new_param)
    store(exp_avg, i, new_exp_avg)
    store(exp_avg_sq, i, new_exp_avg_sq)
    if amsgrad:
        store(max_exp_avg_sq, i, running_max)
    if clear_grad:
        grad[i] = 0
