"""CUDA kernels: the rules of `kernels.rules` compiled as device functions.

Each kernel is a grid-stride loop over 1-D C-contiguous device arrays of one dtype,
with the same coefficient tuples as the CPU kernels (`kernels.hyperparameters`). The
functions at the bottom have the CPU kernels' signatures plus ``stream`` and pick the
launch shape from `kernels.config`. Importing this module needs numba-cuda.
"""

import contextlib
import warnings

from numba import cuda

from . import config, rules

# A small parameter gets a small grid on purpose (one launch per parameter whose
# gradient is read in place); numba-cuda would warn about each such launch.
warnings.filterwarnings(
    "ignore", message="Grid size .* will likely result in GPU under-utilization"
)

# Numba invalidates a cached kernel only when this file changes, not when a rule it
# calls does. This digest of rules.py makes every edit there change this file too;
# tests/test_kernels.py fails until it is updated.
RULES_DIGEST = "a29526485039e556"


@cuda.jit(cache=True)
def _sgd_plain(param, grad, coefficients):
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        param[i] = rules.sgd_plain(param[i], grad[i], *coefficients)


@cuda.jit(cache=True)
def _sgd_momentum(param, grad, velocity, coefficients, nesterov, first_step):
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        param[i], velocity[i] = rules.sgd_momentum(
            param[i], grad[i], velocity[i], *coefficients, nesterov, first_step
        )


@cuda.jit(cache=True)
def _adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, amsgrad):
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        running_max = max_exp_avg_sq[i] if amsgrad else exp_avg_sq[i]
        param[i], exp_avg[i], exp_avg_sq[i], running_max = rules.adam(
            param[i], grad[i], exp_avg[i], exp_avg_sq[i], running_max, *coefficients, amsgrad
        )
        if amsgrad:
            max_exp_avg_sq[i] = running_max


def _launch(kernel, size, stream, device, *args):
    if size == 0:
        return
    with cuda.gpus[device] if device is not None else contextlib.nullcontext():
        if isinstance(stream, int):  # a raw cudaStream_t, e.g. torch's current stream
            stream = cuda.external_stream(stream) if stream else 0
        blocks, threads = config.launch_shape(size)
        kernel[blocks, threads, stream or 0](*args)


def sgd_plain(param, grad, coefficients, stream=None, device=None):
    """`kernels.cpu.sgd_plain` on GPU ``device`` (default: the current one), queued on
    ``stream``: a Numba stream, a raw stream handle, or None for the default stream."""
    _launch(_sgd_plain, param.size, stream, device, param, grad, coefficients)


def sgd_momentum(
    param, grad, velocity, coefficients, nesterov, first_step, stream=None, device=None
):
    """`kernels.cpu.sgd_momentum` on the GPU; ``stream`` and ``device`` as `sgd_plain`."""
    _launch(
        _sgd_momentum,
        param.size,
        stream,
        device,
        param,
        grad,
        velocity,
        coefficients,
        nesterov,
        first_step,
    )


def adam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    coefficients,
    amsgrad,
    stream=None,
    device=None,
):
    """`kernels.cpu.adam` on the GPU; ``stream`` and ``device`` as `sgd_plain`."""
    _launch(
        _adam,
        param.size,
        stream,
        device,
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        coefficients,
        amsgrad,
    )
