"""CUDA kernels: the rules of `kernels.rules` over a launch table, on the GPU.

The same tables as the CPU kernels (`kernels.tables`): each block takes segments of at
most ``config.cuda_chunk()`` elements (grid-stride over the segments) and its threads
stride through the segment's elements; over block-wise 8-bit state a segment is one
block of state and a CUDA block has a thread per element. The functions at the bottom have the CPU
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
from .elements import element, segment_source
from .pointers import pointer_to as _compiled_pointer_to
from .pointers import simulated_pointer_to
from .quantization import (  # noqa: F401 (generated kernels)
    ABSMAX_ZERO,
    BLOCK,
    SIGNED_CODE_ZERO,
    UNSIGNED_CODE_ZERO,
    encode_signed,
    encode_unsigned,
    inverse,
)
from .rules.common import nan_max  # noqa: F401 (generated kernels)

# A small table gets a small grid on purpose; numba-cuda would warn about each launch.
warnings.filterwarnings(
    "ignore", message="Grid size .* will likely result in GPU under-utilization"
)

# Numba invalidates a cached kernel only when this file changes, not when a rule, an
# element step, the pointer intrinsic, a 16-bit conversion or an 8-bit code it inlines
# does. This digest of rules/*.py, elements.py, pointers.py, precision.py and
# quantization.py makes every edit there change this file too; tests/test_kernels.py
# fails until it is updated.
RULES_DIGEST = "01a4f34174eea9c5"

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
    if step.blockwise:
        return _blockwise_kernel_source(step)
    lines = _kernel_head(step)
    arguments = ["i", "param", "grad", *step.state, "coefficients", "values", *step.flags]
    arguments += [*step.entry_flags, "clear", "companion", "param_store", "key"]
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


def _kernel_head(step, shared=()):
    """A kernel's lines down to its segment's set-up (`elements.segment_source`), with
    the ``shared`` lines (shared arrays) before its grid-stride loop."""
    flags = "".join(f", {flag}" for flag in step.flags)
    partials = ", partials" if step.squares else ""
    return [
        f"def _{step.name}(addresses, segments, entry_values, coefficients, formats, clear, "
        f"param_store{flags}{partials}):",
        "    stored_param, stored_grad, stored_state, stored_companion = formats",
        "    last = addresses.shape[1] - 1  # the companion column, unless NEAREST",
        *shared,
        "    for segment in range(cuda.blockIdx.x, segments.shape[0], cuda.gridDim.x):",
        "        entry = segments[segment, 0]",
        *segment_source(step, "        "),
    ]


def _blockwise_kernel_source(step):
    """`kernel_source` over block-wise 8-bit state (`steps.int8_blockwise`): a CUDA
    block of `BLOCK` threads per block of state, one element each. Each state's new
    absmax, and the block's sums of squares, are reductions in shared memory between
    the step and the codes."""
    written, sums = range(len(step.written)), range(len(step.squares))
    shared = [f"    top{k} = cuda.shared.array(BLOCK, float32)" for k in written]
    shared += [f"    square{k} = cuda.shared.array(BLOCK, float64)" for k in sums]
    shared.append("    thread = cuda.threadIdx.x")
    lines = _kernel_head(step, shared)
    lines.append("        begin, end = segments[segment, 1], segments[segment, 2]")
    lines.append("        block, i = begin // BLOCK, begin + thread")
    lines += [f"        new{k} = ABSMAX_ZERO" for k in written]
    lines += _blockwise_step(step, "        ")
    if not (step.written or step.squares):
        return "\n".join(lines) + "\n"  # a pass that only reads its state
    lines += [f"        top{k}[thread] = abs(new{k})" for k in written]
    lines += [f"        square{k}[thread] = sum{k} * sum{k}" for k in sums]
    lines += [
        "        cuda.syncthreads()  # every thread has read the old absmax and kept its values",
        "        width = BLOCK // 2",
        "        while width > 0:",
        "            if thread < width:",
    ]
    for k in written:
        lines.append(
            f"                top{k}[thread] = nan_max(top{k}[thread], top{k}[thread + width])"
        )
    lines += [f"                square{k}[thread] += square{k}[thread + width]" for k in sums]
    lines += ["            cuda.syncthreads()", "            width //= 2"]
    lines += _blockwise_codes(step, "        ")
    lines.append(
        "        cuda.syncthreads()  # before the next segment overwrites the shared arrays"
    )
    return "\n".join(lines) + "\n"


def _blockwise_step(step, indent):
    """The thread's element step, when it has an element: its new state values, and
    its values to square (`steps.Step.squares`) as ``sum0``, … (0 without one)."""
    before = []
    for name in step.state:  # the absmax of the block, unread for a state not used
        flag = step.optional_flag(name)
        absmax = f"{name}_absmax[block]"
        before.append(f"{absmax} if {flag} else ABSMAX_ZERO" if flag else absmax)
    arguments = ["i", "param", "grad", *step.state, *before, "coefficients", "values"]
    arguments += [*step.flags, *step.entry_flags, "clear", "companion", "param_store", "key"]
    call = f"ELEMENT({', '.join(arguments)})"
    returned = len(step.written) + len(step.squares)
    lines = [f"{indent}if i < end:", f"{indent}    {'new = ' if returned else ''}{call}"]
    lines += [f"{indent}    new{k} = new[{k}]" for k in range(len(step.written))]
    for k in range(len(step.squares)):
        lines.append(f"{indent}    sum{k} = float64(new[{len(step.written) + k}])")
    return lines


def _blockwise_codes(step, indent):
    """Each written state's code of the thread's element, and (thread 0) the block's
    new absmax and sums of squares."""
    codes, stores = [f"{indent}if i < end:"], [f"{indent}if thread == 0:"]
    for k, name in enumerate(step.written):
        code = f"{name}[i] = encode_{step.code_kind(name)}(new{k}, inverse(top{k}[0]))"
        absmax = f"{name}_absmax[block] = top{k}[0]"
        flag = step.optional_flag(name)
        if flag:
            codes += [f"{indent}    if {flag}:", f"{indent}        {code}"]
            stores += [f"{indent}    if {flag}:", f"{indent}        {absmax}"]
        else:
            codes.append(f"{indent}    {code}")
            stores.append(f"{indent}    {absmax}")
    stores += [
        f"{indent}    partials[segment, {k}] = square{k}[0]" for k in range(len(step.squares))
    ]
    return (codes if step.written else []) + stores


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
            coefficients, table.formats, table.clear_grads, table.param_store, *flags, *extra,
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
    ``upload(array)`` returns a device copy of a small host array, queued on ``stream``.
    Over block-wise 8-bit state, a segment is a block, and a CUDA block its threads."""
    flags = tuple(bool(flag) for flag in flags)
    squares, block = len(step.squares), BLOCK if step.blockwise else None
    return _launch(kernel(step), table, coefficients, flags, stream, device, upload, block, squares)
