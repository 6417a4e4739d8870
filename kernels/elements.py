"""One element of a step, read from and written back to memory: the rules of
`kernels.rules` applied at index ``i`` of the step's arrays.

The CPU loops and the CUDA kernels differ only in which indices a thread takes; each
calls these for every index it takes. The arrays are whatever indexes elements: typed
pointers (`kernels.pointers`) in compiled code, NumPy views in the CUDA simulator.
"""

from numba.extending import register_jitable

from . import rules


@register_jitable
def sgd_plain_at(i, param, grad, coefficients):
    param[i] = rules.sgd_plain(param[i], grad[i], *coefficients)


@register_jitable
def sgd_momentum_at(i, param, grad, velocity, coefficients, nesterov, first_step):
    param[i], velocity[i] = rules.sgd_momentum(
        param[i], grad[i], velocity[i], *coefficients, nesterov, first_step
    )


@register_jitable
def adam_at(i, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, entry, amsgrad):
    """``entry``: the entry's ``(−lr/(1 − β1ᵗ), √(1 − β2ᵗ))``; ``max_exp_avg_sq`` is
    read and written only with ``amsgrad``."""
    running_max = max_exp_avg_sq[i] if amsgrad else exp_avg_sq[i]
    param[i], exp_avg[i], exp_avg_sq[i], running_max = rules.adam(
        param[i],
        grad[i],
        exp_avg[i],
        exp_avg_sq[i],
        running_max,
        *coefficients,
        entry[0],
        entry[1],
        amsgrad,
    )
    if amsgrad:
        max_exp_avg_sq[i] = running_max
