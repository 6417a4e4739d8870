"""CPU kernels: the rules of `kernels.rules` applied in place over flat arrays.

Each kernel takes 1-D C-contiguous arrays of one dtype (float32 or float64) and a tuple
of coefficients in that same dtype (built by `kernels.hyperparameters`), and touches
every element exactly once: one pass over memory, split across Numba's threads (arrays
shorter than ``config.CPU_SERIAL_BELOW`` run on the calling thread).
"""

import types

from numba import njit, prange

from . import config, rules

# Numba invalidates a cached kernel only when this file changes, not when a rule it
# calls does. This digest of rules.py makes every edit there change this file too;
# tests/test_kernels.py fails until it is updated.
RULES_DIGEST = "a29526485039e556"


@njit(parallel=True, cache=True)
def _sgd_plain(param, grad, coefficients):
    """The threaded loop of `sgd_plain`."""
    for i in prange(param.size):
        param[i] = rules.sgd_plain(param[i], grad[i], *coefficients)


@njit(parallel=True, cache=True)
def _sgd_momentum(param, grad, velocity, coefficients, nesterov, first_step):
    """The threaded loop of `sgd_momentum`."""
    for i in prange(param.size):
        param[i], velocity[i] = rules.sgd_momentum(
            param[i], grad[i], velocity[i], *coefficients, nesterov, first_step
        )


# arcp lets LLVM replace the division by the loop-invariant √(1 − β2ᵗ) with one reciprocal
# and a multiply (≤1 ulp apart); Adam is compute-bound on division and square root while
# the arrays sit in cache: 49 → 40 µs on the 784-256-10 MLP's 203k float32 params.
@njit(parallel=True, cache=True, fastmath={"arcp"})
def _adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, amsgrad):
    """The threaded loop of `adam`."""
    for i in prange(param.size):
        running_max = max_exp_avg_sq[i] if amsgrad else exp_avg_sq[i]
        param[i], exp_avg[i], exp_avg_sq[i], running_max = rules.adam(
            param[i], grad[i], exp_avg[i], exp_avg_sq[i], running_max, *coefficients, amsgrad
        )
        if amsgrad:
            max_exp_avg_sq[i] = running_max


def _serial(kernel):
    """The same loop compiled without threads (and under its own cache name).

    Waking the thread pool costs more than short arrays take: 64 elements 0.8 µs serial
    against 4.1 µs parallel, 32k elements 4.4 against 7.0 µs, 256k 45 against 35 µs.
    """
    loop = kernel.py_func
    twin = types.FunctionType(
        loop.__code__, loop.__globals__, loop.__name__ + "_serial", loop.__defaults__
    )
    twin.__qualname__ = loop.__qualname__ + "_serial"
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    return njit(cache=True, **options)(twin)


_sgd_plain_serial = _serial(_sgd_plain)
_sgd_momentum_serial = _serial(_sgd_momentum)
_adam_serial = _serial(_adam)


def _loop(threaded, serial, size):
    return serial if size < config.CPU_SERIAL_BELOW else threaded


def sgd_plain(param, grad, coefficients):
    """``p ← p − lr·(f·g + λ·p)``; coefficients ``(lr, grad_factor, weight_decay)``."""
    _loop(_sgd_plain, _sgd_plain_serial, param.size)(param, grad, coefficients)


def sgd_momentum(param, grad, velocity, coefficients, nesterov, first_step):
    """SGD with momentum (`rules.sgd_momentum`); coefficients in that rule's order."""
    kernel = _loop(_sgd_momentum, _sgd_momentum_serial, param.size)
    kernel(param, grad, velocity, coefficients, nesterov, first_step)


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, amsgrad):
    """Adam/AdamW (`rules.adam`); ``max_exp_avg_sq`` is only touched when ``amsgrad``."""
    kernel = _loop(_adam, _adam_serial, param.size)
    kernel(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, amsgrad)
