"""CUDA kernels: the rules of `kernels.rules` over a launch table, on the GPU.

The same tables as the CPU kernels (`kernels.tables`): each block takes segments of at
most ``config.cuda_chunk()`` elements (grid-stride over the segments) and its threads
stride through the segment's elements. The functions at the bottom have the CPU
kernels' signatures plus ``stream``, ``device`` and ``upload`` (how the table's small
host arrays reach the GPU; by default a Numba copy on ``stream``). Importing this module
needs numba-cuda.
"""

import contextlib
import functools
import warnings

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, float64  # noqa: F401 (float64: generated kernels)

from . import config, diskcache, precision, quantization
from .elements import adam_blockwise_at, element, segment_source, sgd_momentum_blockwise_at
from .pointers import pointer_to as _compiled_pointer_to
from .pointers import simulated_pointer_to
from .quantization import BLOCK, encode_signed, encode_unsigned, inverse
from .rules.common import nan_max

# A small table gets a small grid on purpose; numba-cuda would warn about each launch.
warnings.filterwarnings(
    "ignore", message="Grid size .* will likely result in GPU under-utilization"
)

# Numba invalidates a cached kernel only when this file changes, not when a rule, an
# element step, the pointer intrinsic, a 16-bit conversion or an 8-bit code it inlines
# does. This digest of rules/*.py, elements.py, pointers.py, precision.py and
# quantization.py makes every edit there change this file too; tests/test_kernels.py
# fails until it is updated.
RULES_DIGEST = "eb7b749987d9d9f9"

# The simulator runs kernels as Python, where an intrinsic cannot run (and `load` and
# `store` run as the Python functions they are).
if numba_config.ENABLE_CUDASIM:
    pointer_to = simulated_pointer_to
else:
    pointer_to = _compiled_pointer_to
    precision.register_cuda()
    quantization.register_cuda()


def kernel(step):
    """The CUDA kernel of ``step`` (a `steps.Step`), generated once from
    `kernel_source`: blocks take segments (grid-stride), their threads stride through a
    segment's elements, each applying the rule's element step (`elements.element`).
    The rule's flags are arguments; entry flags are read per segment."""
    return _generated_kernel(step)


@functools.cache
def _generated_kernel(step):
    namespace = {**globals(), "ELEMENT": element(step)}
    exec(compile(kernel_source(step), __file__, "exec"), namespace)
    return cuda.jit(cache=diskcache.available(__file__))(namespace[f"_{step.name}"])


def kernel_source(step):
    """The source of `kernel` (readable: ``print(kernel_source(rules.adam.STEP))``)."""
    flags = "".join(f", {flag}" for flag in step.flags)
    partials = ", partials" if step.squares else ""
    lines = [
        f"def _{step.name}(addresses, segments, entry_values, coefficients, formats, clear, "
        f"mirrored{flags}{partials}):",
        "    stored_param, stored_grad, stored_state, stored_mirror = formats",
        "    last = addresses.shape[1] - 1  # the mirror column, when mirrored",
        "    for segment in range(cuda.blockIdx.x, segments.shape[0], cuda.gridDim.x):",
        "        entry = segments[segment, 0]",
        *segment_source(step, "        "),
    ]
    arguments = ["i", "param", "grad", *step.state, "coefficients", "values", *step.flags]
    arguments += [*step.entry_flags, "clear", "mirror", "mirrored"]
    call = f"ELEMENT({', '.join(arguments)})"
    lines += [
        "        first, end = segments[segment, 1] + cuda.threadIdx.x, segments[segment, 2]",
        "        for i in range(first, end, cuda.blockDim.x):",
        f"            {'summed = ' if step.squares else ''}{call}",
    ]
    for k in range(len(step.squares)):
        lines += [
            f"            value{k} = float64(summed[{k}])",
            f"            sum{k} += value{k} * value{k}",
        ]
    for k in range(len(step.squares)):  # each thread's sums into its segment's
        lines.append(f"        cuda.atomic.add(partials, (segment, {k}), sum{k})")
    return "\n".join(lines) + "\n"


#: Element types of block-wise 8-bit state, as the zero scalars `pointer_to` types on.
_SIGNED_CODE = quantization.SIGNED_CODE(0)
_UNSIGNED_CODE = quantization.UNSIGNED_CODE(0)
_ABSMAX = np.float32(0)


@cuda.jit(cache=diskcache.available(__file__))
def _adam_blockwise(addresses, segments, entry_values, coefficients, formats, clear, mirrored):
    """Block-wise 8-bit Adam (`kernels.cpu._adam_blockwise`): a CUDA block of `BLOCK`
    threads per block of state, one element each; the block's new absmax is a
    reduction in shared memory between the step and the codes."""
    stored_param, stored_grad, stored_state, stored_mirror = formats
    exp_avg_top = cuda.shared.array(BLOCK, float32)
    exp_avg_sq_top = cuda.shared.array(BLOCK, float32)
    thread = cuda.threadIdx.x
    for segment in range(cuda.blockIdx.x, segments.shape[0], cuda.gridDim.x):
        entry, begin, end = segments[segment, 0], segments[segment, 1], segments[segment, 2]
        param = pointer_to(addresses[entry, 0], stored_param)
        grad = pointer_to(addresses[entry, 1], stored_grad)
        exp_avg = pointer_to(addresses[entry, 2], _SIGNED_CODE)
        exp_avg_sq = pointer_to(addresses[entry, 3], _UNSIGNED_CODE)
        exp_avg_absmax = pointer_to(addresses[entry, 4], _ABSMAX)
        exp_avg_sq_absmax = pointer_to(addresses[entry, 5], _ABSMAX)
        step = (entry_values[entry, 0], entry_values[entry, 1])
        block, i = begin // BLOCK, begin + thread
        new_exp_avg, new_exp_avg_sq = _ABSMAX, _ABSMAX
        if i < end:
            new_exp_avg, new_exp_avg_sq = adam_blockwise_at(
                i, param, grad, exp_avg, exp_avg_sq, exp_avg_absmax[block],
                exp_avg_sq_absmax[block], coefficients, step, clear,
            )  # fmt: skip
        exp_avg_top[thread] = abs(new_exp_avg)
        exp_avg_sq_top[thread] = new_exp_avg_sq
        cuda.syncthreads()  # every thread has read the old absmax, and written its values
        width = BLOCK // 2
        while width > 0:
            if thread < width:
                exp_avg_top[thread] = nan_max(exp_avg_top[thread], exp_avg_top[thread + width])
                exp_avg_sq_top[thread] = nan_max(
                    exp_avg_sq_top[thread], exp_avg_sq_top[thread + width]
                )
            cuda.syncthreads()
            width //= 2
        if i < end:
            exp_avg[i] = encode_signed(new_exp_avg, inverse(exp_avg_top[0]))
            exp_avg_sq[i] = encode_unsigned(new_exp_avg_sq, inverse(exp_avg_sq_top[0]))
        if thread == 0:
            exp_avg_absmax[block] = exp_avg_top[0]
            exp_avg_sq_absmax[block] = exp_avg_sq_top[0]
        cuda.syncthreads()  # before the next segment overwrites the shared arrays


@cuda.jit(cache=diskcache.available(__file__))
def _sgd_momentum_blockwise(
    addresses, segments, entry_values, coefficients, formats, clear, mirrored, nesterov
):
    """SGD momentum with an 8-bit buffer, a CUDA block per block of state, as
    `_adam_blockwise`."""
    stored_param, stored_grad, stored_state, stored_mirror = formats
    top = cuda.shared.array(BLOCK, float32)
    thread = cuda.threadIdx.x
    for segment in range(cuda.blockIdx.x, segments.shape[0], cuda.gridDim.x):
        entry, begin, end = segments[segment, 0], segments[segment, 1], segments[segment, 2]
        param = pointer_to(addresses[entry, 0], stored_param)
        grad = pointer_to(addresses[entry, 1], stored_grad)
        velocity = pointer_to(addresses[entry, 2], _SIGNED_CODE)
        velocity_absmax = pointer_to(addresses[entry, 3], _ABSMAX)
        first_step = entry_values[entry, 0] != 0
        block, i = begin // BLOCK, begin + thread
        new_velocity = _ABSMAX
        if i < end:
            new_velocity = sgd_momentum_blockwise_at(
                i, param, grad, velocity, velocity_absmax[block], coefficients, nesterov,
                first_step, clear,
            )  # fmt: skip
        top[thread] = abs(new_velocity)
        cuda.syncthreads()
        width = BLOCK // 2
        while width > 0:
            if thread < width:
                top[thread] = nan_max(top[thread], top[thread + width])
            cuda.syncthreads()
            width //= 2
        if i < end:
            velocity[i] = encode_signed(new_velocity, inverse(top[0]))
        if thread == 0:
            velocity_absmax[block] = top[0]
        cuda.syncthreads()


def _launch(kernel, table, coefficients, flags, stream, device, upload, block=None, squares=0):
    """Queue ``kernel`` over ``table``; with ``squares`` sums per segment, wait for them
    and return them per entry (float64, shape ``(entries, squares)``)."""
    sums = np.zeros((len(table), squares)) if squares else None
    if table.size == 0:
        return sums
    with cuda.gpus[device] if device is not None else contextlib.nullcontext():
        if isinstance(stream, int):  # a raw cudaStream_t, e.g. torch's current stream
            stream = cuda.external_stream(stream) if stream else 0
        stream = stream or 0
        if upload is None:
            upload = lambda array: cuda.to_device(array, stream=stream)  # noqa: E731
        segments = table.cuda_segments(block or config.cuda_chunk())
        blocks, threads = config.launch_shape(len(segments))
        threads = block or threads  # block-wise state: a thread per element of a block
        extra = ()
        if squares:
            extra = (cuda.to_device(np.zeros((len(segments), squares)), stream=stream),)
        kernel[blocks, threads, stream](
            upload(table.addresses), upload(segments), upload(table.entry_values),
            coefficients, table.formats, table.clear_grads, table.mirrored, *flags, *extra,
        )  # fmt: skip
        if not squares:
            return None
        partials = extra[0].copy_to_host(stream=stream)
        if stream:
            stream.synchronize()
    np.add.at(sums, segments[:, 0], partials)
    return sums


def launch(table, step, coefficients, flags=(), stream=None, device=None, upload=None):
    """`kernels.cpu.launch` on GPU ``device`` (default: the current one), queued on
    ``stream``: a Numba stream, a raw stream handle, or None for the default stream.
    ``upload(array)`` returns a device copy of a small host array, queued on ``stream``."""
    flags = tuple(bool(flag) for flag in flags)
    squares = len(step.squares)
    return _launch(kernel(step), table, coefficients, flags, stream, device, upload, None, squares)


def adam_blockwise(table, coefficients, stream=None, device=None, upload=None):
    """`kernels.cpu.adam_blockwise` on the GPU; the other arguments as `launch`'s."""
    _launch(_adam_blockwise, table, coefficients, (), stream, device, upload, BLOCK)


def sgd_momentum_blockwise(table, coefficients, nesterov, stream=None, device=None, upload=None):
    """`kernels.cpu.sgd_momentum_blockwise` on the GPU; the other arguments as `launch`'s."""
    _launch(
        _sgd_momentum_blockwise, table, coefficients, (nesterov,), stream, device, upload, BLOCK
    )
