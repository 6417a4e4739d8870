"""Traffic twins: kernels that move exactly an optimizer step's bytes with trivial math.

A step is memory-bound, so the time a twin takes over the same number of parameters is
the floor for that step on this machine, measured in the same run. Each twin reads and
writes the same arrays as its optimizer (SGD with momentum: read p, g, v, write p, v,
20 bytes per float32 parameter; Adam: read p, g, m, v, write p, m, v, 28 bytes; LAMB:
Adam's reads and its moments' writes, then read p, m, v and write p, 40 bytes) and
computes ``x ← g − x``, which keeps every value bounded however often it runs.
"""

from numba import njit, prange


@njit(parallel=True, cache=True)
def sgd_momentum_twin(param, grad, velocity):
    for i in prange(param.size):
        g = grad[i]
        param[i] = g - param[i]
        velocity[i] = g - velocity[i]


@njit(parallel=True, cache=True)
def adam_twin(param, grad, exp_avg, exp_avg_sq):
    for i in prange(param.size):
        g = grad[i]
        param[i] = g - param[i]
        exp_avg[i] = g - exp_avg[i]
        exp_avg_sq[i] = g - exp_avg_sq[i]


@njit(parallel=True, cache=True)
def lamb_twin(param, grad, exp_avg, exp_avg_sq):
    """Two passes, as LAMB's step (the sum stands for its norms, and makes the first pass
    read the parameters)."""
    total = 0.0
    for i in prange(param.size):
        g = grad[i]
        total += param[i]
        exp_avg[i] = g - exp_avg[i]
        exp_avg_sq[i] = g - exp_avg_sq[i]
    for i in prange(param.size):
        param[i] = exp_avg[i] - exp_avg_sq[i] - param[i]
    return total


@njit(parallel=True, cache=True)
def muon_twin(param, grad, momentum_buffer, update):
    """Muon's two passes (36 bytes): read p, g, B, U and write B, U; then read U and p
    and write p (the Newton–Schulz iteration between them is not memory traffic)."""
    total = 0.0
    for i in prange(param.size):
        g = grad[i]
        total += param[i]
        momentum_buffer[i] = g - momentum_buffer[i]
        update[i] = g - update[i]
    for i in prange(param.size):
        param[i] = update[i] - param[i]
    return total


@njit(parallel=True, cache=True)
def adam_master_twin(master, grad, exp_avg, exp_avg_sq, param):
    """Adam with master weights: read the master copy, the gradient and both moments,
    write them back and the parameter (16-bit arrays as their int16 bits)."""
    for i in prange(master.size):
        g = grad[i]
        value = g - master[i]
        master[i] = value
        exp_avg[i] = g - exp_avg[i]
        exp_avg_sq[i] = g - exp_avg_sq[i]
        param[i] = value


@njit(parallel=True, cache=True)
def sgd_momentum_master_twin(master, grad, velocity, param):
    """SGD momentum with master weights: read and write the master copy and the
    buffer, read the gradient, write the parameter."""
    for i in prange(master.size):
        g = grad[i]
        value = g - master[i]
        master[i] = value
        velocity[i] = g - velocity[i]
        param[i] = value


@njit(parallel=True, cache=True)
def adam_kahan_twin(param, grad, compensation, exp_avg, exp_avg_sq):
    """Adam with Kahan summation: Adam's arrays and a compensation read and written."""
    for i in prange(param.size):
        g = grad[i]
        param[i] = g - param[i]
        compensation[i] = g - compensation[i]
        exp_avg[i] = g - exp_avg[i]
        exp_avg_sq[i] = g - exp_avg_sq[i]
