"""CUDA kernels: the rules of `kernels.rules` over a launch table, on the GPU.

The same tables as the CPU kernels (`kernels.tables`): each block takes segments of at
most ``config.cuda_chunk()`` elements (grid-stride over the segments) and its threads
stride through the segment's elements, several at a time, each loaded before the first
is stored, with one vector load per array where the segment's arrays are aligned
(`_element_loop`). Over block-wise 8-bit state (`cuda_blockwise`) a warp takes a block
of state at a time, 8 elements a thread, and reduces its new absmax by shuffles. The
functions at the bottom
have the CPU kernels' signatures plus ``stream``, ``device`` and ``upload`` (how the
table's small host arrays reach the GPU; by default a Numba copy on ``stream``).
Importing this module needs numba-cuda.

A rule's flags (``amsgrad``, ``nesterov``) are constants of the kernel, one kernel per
value, as the CPU compiles a loop per value: a kernel with its flags as arguments kept
the registers of its heaviest path for every launch (RMSprop on bfloat16 parameters: 94
registers, 2 blocks of 256 per SM, where its usual launch, no momentum and not centered,
needs 64 and 4 blocks; bench.gpu_static). ``clear`` and ``param_store`` stay arguments: a
branch on an argument is the same way in every thread of a warp, so it never diverges
and costs a predicate per element in a loop bound by memory. A kernel is compiled on its
first launch, so a run compiles only the flag values it uses.
"""

import contextlib
import functools
import warnings
from typing import NamedTuple

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, float64, int32  # noqa: F401 (generated kernels)

from . import (
    capturable,
    config,
    contraction,
    cuda_blockwise,
    generated,
    precision,
    quantization,
    sums,
    vectors,
)
from .capturable import same_type  # noqa: F401 (generated kernels)
from .elements import segment_source, split
from .pointers import pointer_to as _compiled_pointer_to
from .pointers import simulated_pointer_to
from .precision import element_size  # noqa: F401 (generated kernels)
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
from .tables import KAHAN, MIRRORED  # noqa: F401 (generated kernels)
from .vectors import vector_aligned  # noqa: F401 (generated kernels)

# A small table gets a small grid on purpose; numba-cuda would warn about each launch
# (its message may begin with a terminal's bold code: seen on an H200, 113 times a run).
warnings.filterwarnings(
    "ignore", message=".*Grid size .* will likely result in GPU under-utilization"
)

# The simulator runs kernels as Python, where an intrinsic cannot run (and `load` and
# `store` run as the Python functions they are).
if numba_config.ENABLE_CUDASIM:
    pointer_to = simulated_pointer_to
else:
    pointer_to = _compiled_pointer_to
    precision.register_cuda()
    quantization.register_cuda()
    vectors.register_cuda()


def kernel(spec, flags=None, max_registers=None):
    """The CUDA kernel of ``spec`` (a `specs.KernelSpec`) for ``flags``, the values of
    ``spec.flags`` in order (default: all False), generated once from `kernel_source`:
    blocks take segments (grid-stride), their threads stride through a segment's
    elements, each applying the rule's element step (`elements.split`; over block-wise
    state a warp per block of state, `cuda_blockwise.kernel_source`). The flags are
    constants of the kernel; entry flags are read per segment. With ``max_registers``,
    compiled to use at most that many registers a thread (ptxas's ``-maxrregcount``;
    `fitted` says when)."""
    return _generated_kernel(spec, flag_values(spec, flags), max_registers)


def kernels_of(spec):
    """Every kernel of ``spec`` generated in this process (any flags and limit)."""
    return [found for (owner, *_), found in _generated.items() if owner is spec]


def fitted(spec, flags, table, arguments):
    """The `kernel` a launch of ``spec`` with ``flags`` over ``table`` runs (``arguments``:
    the launch's): as ptxas compiles it, unless that takes more registers than
    `register_limit`; then compiled again within the limit, so that the blocks per SM
    the bytes-in-flight target needs are resident (capturable RAdam on bfloat16 state,
    sm_90: 83 registers and 2 blocks of 256; 80 and 3). A limit is given only where it
    binds: given one it does not need, ptxas takes more registers, up to it (capturable
    Adam on float32, then compiled with contraction: 76 and 3 blocks; under a limit of
    128, 90 and 2; bench/NOTES.md entry 29). Nor where the limited kernel spills (uses
    local memory): a spill costs more than a block. Decided on the first launch for each
    set of element types (and `config.CUDA_CONTRACTION`), which compiles the kernel (and
    the limited one, where it is tried) with this device's compiler; the simulator,
    which has no registers, runs the kernel as written."""
    formats = tuple(map(type, table.formats))
    key = LaunchKind(spec, flags, table.dtype, formats, len(arguments), config.CUDA_CONTRACTION)
    if key not in _fitted:
        found, given = kernel(spec, flags), None
        limit = register_limit(spec, flags, table.formats)
        if limit is not None and _resources(found, arguments)[0] > limit:
            limited = kernel(spec, flags, limit)
            if _resources(limited, arguments)[1] == 0:
                found, given = limited, limit
        _fitted[key] = given, found
    return _fitted[key][1]


def launched():
    """What `fitted` chose in this process, one ``(spec, flags, element types, limit,
    kernel)`` per launch kind: the table's param, grad, state and companion types (16-bit
    floats as their integer carriers) and the register limit given, or None."""
    return [(kind.spec, kind.flags, kind.formats, *chosen) for kind, chosen in _fitted.items()]


def _resources(dispatcher, arguments):
    """``(registers a thread, bytes of local memory a thread)`` of ``dispatcher``'s
    kernel for the types of ``arguments``, compiled and loaded; ``(0, 0)`` in the
    simulator."""
    if numba_config.ENABLE_CUDASIM:
        return 0, 0
    compiled = dispatcher.compile(tuple(dispatcher.typeof_pyval(value) for value in arguments))
    return compiled.regs_per_thread, compiled.local_mem_per_thread


class LaunchKind(NamedTuple):
    """What `fitted` decides on once: a spec, its flags and what sets the types of its
    launch's arguments (the table's compute type, the types of its `tables.TensorTable.
    formats`, the count of arguments), and whether NVVM may contract (`kernel` keeps the
    two builds apart too)."""

    spec: object
    flags: tuple
    dtype: object
    formats: tuple
    arguments: int
    contraction: bool


_fitted = {}  # LaunchKind -> (limit given, kernel)


def register_limit(spec, flags, formats):
    """The most registers a thread of ``spec``'s kernel with ``flags`` may take over
    tables of ``formats`` (param, grad, state and companion element types): as many as
    let the fewest blocks of `config.THREADS_PER_BLOCK` threads that keep
    `config.BYTES_IN_FLIGHT_PER_SM` in flight be resident on an SM together (its
    `config.REGISTERS_PER_SM`, allocated 8 a thread at a time), each thread loading a
    group of `_element_loop` (`config.BYTES_IN_FLIGHT_PER_ARRAY` of the widest array, as
    many elements of the others). The arrays counted are those a step may read: param,
    grad and each state array in use. A rule that ignores one (an apply pass reads no
    gradient) loads less than counted and is allowed more registers than the target
    leaves it, never fewer; bench.gpu_static measures what it loads. None for
    block-wise 8-bit state, whose launches have a shape of their own
    (`cuda_blockwise.launch_shape`). Applied where it binds (`fitted`)."""
    if spec.blockwise:
        return None
    param, grad, state, _ = (np.asarray(value).itemsize for value in formats)
    chosen = dict(zip(spec.flags, flag_values(spec, flags)))
    sizes = [param, grad]
    sizes += [state for name in spec.state if chosen.get(spec.optional_flag(name), True)]
    per_thread = config.BYTES_IN_FLIGHT_PER_ARRAY // max(sizes) * sum(sizes)
    threads = config.THREADS_PER_BLOCK
    blocks = -(-config.BYTES_IN_FLIGHT_PER_SM // (threads * per_thread))
    return min(255, config.REGISTERS_PER_SM // (blocks * threads) // 8 * 8)


def flag_values(spec, flags=None):
    """``flags`` as a tuple of bools, one per flag of ``spec`` (default: all False)."""
    flags = (False,) * len(spec.flags) if flags is None else tuple(bool(f) for f in flags)
    if len(flags) != len(spec.flags):
        raise ValueError(f"{spec.name} takes {len(spec.flags)} flags {spec.flags}, not {flags}")
    return flags


def _generated_kernel(spec, flags, max_registers):
    key = (spec, flags, max_registers, config.CUDA_CONTRACTION)
    if key not in _generated:
        _generated[key] = _new_kernel(spec, flags, max_registers)
    return _generated[key]


_generated = {}  # (spec, flags, max_registers, contraction) -> its kernel


def _new_kernel(spec, flags, max_registers):
    namespace = {**globals(), "LIVE": spec.live, "FROM_SUMS": spec.from_sums}
    if spec.blockwise:
        namespace.update(cuda_blockwise.namespace(spec))
    else:
        loads, vector_loads, update, vector_updates = split(spec, _vector_counts())
        namespace.update(LOADS=loads, VECTOR_LOADS=vector_loads, UPDATE=update)
        namespace.update((f"VECTOR_UPDATE{n}", f) for n, f in vector_updates.items())
    source = contraction.source_note() + kernel_source(spec, flags)
    options = {}
    if max_registers is not None:  # in the source too: its file, hence its cache, differ
        source = f"# at most {max_registers} registers a thread (register_limit)\n{source}"
        if not numba_config.ENABLE_CUDASIM:  # which takes no register limit
            options["max_registers"] = max_registers
    cacheable = generated.compile_into(namespace, "cuda", spec, source)
    return cuda.jit(cache=cacheable, **options)(namespace[f"_{spec.name}"])


def kernel_source(spec, flags=None):
    """The source of `kernel` (readable: ``print(kernel_source(rules.adam.SPEC, [True]))``):
    the flags' values, then per segment the entry's pointers and values, then its
    elements (`_element_loop`: vector loads where the segment's arrays are aligned,
    scalar loads elsewhere); the sums of squares and the capturable kernels' lines
    around them."""
    flags = flag_values(spec, flags)
    if spec.blockwise:
        head = functools.partial(_kernel_head, flags=flags)
        return cuda_blockwise.kernel_source(spec, head, sums.epilogue)
    lines = _kernel_head(spec, flags=flags)
    lines.append(
        "        first, end = segments[segment, 1] + cuda.threadIdx.x, segments[segment, 2]"
    )
    if spec.capturable:  # found_inf set: no element steps
        lines += capturable.skip_lines("        ")
        lines += _element_loop(spec, "            ")
    else:
        lines += _element_loop(spec, "        ")
    lines += sums.segment_totals(spec, "        ")  # each thread's sums into its segment's
    if spec.squares or spec.capturable:  # an epilogue follows, which needs the entry:
        # read again, as held through the element loop it cost registers (NOTES entry 28)
        lines.append("        entry = segments[segment, 0]")
    lines += sums.epilogue(spec, "        ")
    if spec.capturable:
        lines += capturable.epilogue(spec, "        ")
    return "\n".join(lines) + "\n"


def _element_loop(spec, indent):
    """A thread's elements of its segment (``first`` on to ``end``, a block's threads
    apart) in groups: every array's element of each member loaded (`elements.split`)
    before the first is computed and stored, so that their loads are in flight together
    (the arrays of an entry do not overlap: a store to one element never changes
    another's value). A group takes `config.BYTES_IN_FLIGHT_PER_ARRAY` of its widest
    array (16: 4 float32 elements, 8 of 16 bits, 2 float64), a choice NVVM makes at
    compile time from the arrays' types.

    Where every array the segment loads or stores is aligned to a group at the
    segment's first element (`_aligned`), thread ``t``'s groups are ``count``
    consecutive elements (``begin + count·t`` on, then a block's groups further), each
    array's read by one vector load (``ld.global.v4``, ``.v2``: `elements.split`'s
    vector loads) and, once the rule has run on each element, written by one vector
    store (``st.global.v4``: its vector updates), so that a warp's store is 512
    consecutive bytes of the widest array, not 4 in every 16. Elsewhere
    (an array at an odd element offset, a view into a buffer), today's whole tiles of a
    warp's 32 groups, group ``g`` at the tile's elements ``g mod 32 + 32·k``, so that a
    warp's scalar load is 32 consecutive elements and a member's address is the first's
    plus a constant (one address register per array). Then, on either path, the rest of
    the segment one element at a time. bench.gpu_static reads the PTX, tests/test_vectors.py
    runs both paths in the simulator, bench.gpu_check ran them on an H200 (docs/gpu.md)."""
    arrays = ["param", "grad", *spec.state]
    loads = ", ".join([*arrays, "coefficients", *spec.flags, "companion", "param_store"])
    update = [*arrays, "coefficients", "values", *spec.flags, *spec.entry_flags]
    update = ", ".join([*update, "clear", "companion", "param_store", "key"])
    summed = "summed = " if spec.squares else ""
    sizes = ", ".join(f"element_size({name})" for name in arrays)
    counts = _vector_counts()
    lines = [
        "begin = segments[segment, 1]",
        f"count = {config.BYTES_IN_FLIGHT_PER_ARRAY} // max({sizes})  # a constant",
        *_aligned(spec),
        "if aligned:",
        "    groups = (end - begin) // count",
        "else:",
        "    groups = (end - begin) // (32 * count) * 32  # in whole tiles",
        "group = cuda.threadIdx.x",
    ]
    for position, count in enumerate(reversed(counts)):
        test = f"count >= {count}" if position < len(counts) - 1 else ""
        lines.append(f"{'if' if position == 0 else 'elif'} {test}:" if test else "else:")
        lines += [
            "    if aligned:",
            "        while group < groups:",
            f"            i = begin + group * {count}",
            f"            loaded = VECTOR_LOADS(i, {count}, {loads})",
            f"            {summed}VECTOR_UPDATE{count}(i, loaded, {update})",
        ]
        for k in range(count):
            lines += _summed(spec, "            ", f"summed[{k}]")
        lines += ["            group += cuda.blockDim.x", "    else:"]
        at = ["i"] + [f"i + {32 * k}" for k in range(1, count)]
        lines += [
            "        while group < groups:",
            f"            i = begin + group // 32 * {32 * count} + group % 32",
        ]
        lines += [f"            loaded{k} = LOADS({index}, {loads})" for k, index in enumerate(at)]
        for k, index in enumerate(at):
            lines.append(f"            {summed}UPDATE({index}, loaded{k}, {update})")
            lines += _summed(spec, "            ")
        lines.append("            group += cuda.blockDim.x")
    lines.append("for i in range(first + groups * count, end, cuda.blockDim.x):")
    lines.append(f"    {summed}UPDATE(i, LOADS(i, {loads}), {update})")
    lines += _summed(spec, "    ")
    return [indent + line for line in lines]


def _aligned(spec):
    """The lines that set ``aligned``: whether every array the segment loads or stores
    is aligned at its first element to a group of ``count`` elements
    (`vectors.vector_aligned`): param, grad, each state (an optional one when its flag
    is set) and the companion when it is an array (`KAHAN`, `MIRRORED`)."""
    columns = [("param", "0"), ("grad", "1")]
    columns += [(name, str(column)) for column, name in enumerate(spec.state, start=2)]
    lines = []
    for name, column in columns:
        test = f"vector_aligned(addresses[entry, {column}], begin, count, {name})"
        flag = spec.optional_flag(name)
        test = f"(not {flag} or {test})" if flag else test
        lines.append(f"aligned = aligned and {test}" if lines else f"aligned = {test}")
    test = "vector_aligned(addresses[entry, last], begin, count, companion)"
    companion = "param_store != KAHAN and param_store != MIRRORED"
    lines.append(f"aligned = aligned and ({companion} or {test})")
    return lines


def _vector_counts():
    """The lengths of the vectors a thread loads and stores, one per element size (2, 4
    and 8 bytes): `config.BYTES_IN_FLIGHT_PER_ARRAY` of each, at least 1 element."""
    return tuple(sorted({max(1, config.BYTES_IN_FLIGHT_PER_ARRAY // size) for size in (2, 4, 8)}))


def _summed(spec, indent, summed="summed"):
    """The lines that add the squares of ``summed`` (one element's values) to the
    thread's sums."""
    lines = []
    for k in range(len(spec.squares)):
        lines.append(f"{indent}value{k} = float64({summed}[{k}])")
        lines.append(f"{indent}sum{k} += value{k} * value{k}")
    return lines


def _kernel_head(spec, shared=(), flags=()):
    """A kernel's lines down to its segment's set-up (`elements.segment_source`): the
    values of its ``flags`` (constants: NVVM compiles only their path), then the
    ``shared`` lines (shared arrays) before its grid-stride loop."""
    uniform = ", uniform, uniform_values" if spec.entry_coefficient_count else ""
    measured = sums.kernel_arguments(spec)
    live = capturable.kernel_arguments(spec) if spec.capturable else ""
    return [
        f"def _{spec.name}(addresses, segments, entry_values, coefficients, formats, clear, "
        f"param_store{uniform}{measured}{live}):",
        *(f"    {name} = {value}" for name, value in zip(spec.flags, flags)),
        "    stored_param, stored_grad, stored_state, stored_companion = formats",
        "    last = addresses.shape[1] - 1  # the companion column, unless NEAREST",
        *(capturable.prologue(spec) if spec.capturable else ()),
        *sums.prologue(spec),
        *shared,
        "    for segment in range(cuda.blockIdx.x, segments.shape[0], cuda.gridDim.x):",
        "        entry = segments[segment, 0]",
        *(capturable.coefficient_lines(spec, "        ") if spec.capturable else ()),
        *segment_source(spec, "        ", uniform=True),
        # the live coefficients before the trust ratio that multiplies one of them
        *(capturable.segment_lines(spec, "        ") if spec.capturable else ()),
        *sums.segment_lines(spec, "        "),
    ]


class Counts:
    """What the launches of this process did on the host, counted where it happens (for
    tests/test_cuda.py): ``launches`` kernels queued, ``uploads`` host-to-device copies
    and ``waits``, where the host stops until the GPU has caught up (a copy back to the
    host and its stream's synchronisation)."""

    __slots__ = ("launches", "uploads", "waits")

    def __init__(self):
        self.reset()

    def reset(self):
        self.launches = self.uploads = self.waits = 0

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


#: The counts of every launch of this process (`Counts`).
COUNTS = Counts()


def _launch(
    flags, table, coefficients, stream, device, upload, shape=None, spec=None, live=None,
    capturing=False, keep_sums=False, sums=None,
):  # fmt: skip
    """Queue the kernel of ``spec`` with ``flags`` (`fitted`) over ``table``: segments of
    ``config.cuda_chunk()`` elements over blocks of `config.launch_shape`'s threads, or
    ``shape``, ``(elements per segment, threads per block)`` (block-wise state:
    `cuda_blockwise.launch_shape`). With ``spec.squares``, return the sums per entry
    (float64, shape ``(entries, squares)``): a device array with ``keep_sums``, else
    copied to the host, which waits for them. ``live``: the `capturable.LiveInputs` of a
    capturable kernel; ``capturing``: a CUDA graph is being captured on ``stream``
    (`_resident`); ``sums``: the device array of sums a ``from_sums`` spec reads
    (`kernels.sums`)."""
    squares = len(spec.squares)
    if table.size == 0:
        return np.zeros((len(table), squares)) if squares else None
    with cuda.gpus[device] if device is not None else contextlib.nullcontext():
        if isinstance(stream, int):  # a raw cudaStream_t, e.g. torch's current stream
            stream = cuda.external_stream(stream) if stream else 0
        stream = stream or 0
        if upload is None:
            upload = lambda array: cuda.to_device(array, stream=stream)  # noqa: E731
        chunk, threads = shape or (config.cuda_chunk(), None)
        segments = table.cuda_segments(chunk)
        blocks, usual_threads = config.launch_shape(len(segments))
        threads = threads or usual_threads
        scratch = ()  # zeroed once, and left zeroed (or overwritten) by every launch
        if squares:  # partial sums per segment, sums per entry, finished segments
            scratch = (np.zeros((len(segments), squares)), np.zeros((len(table), squares)))
        if squares or live is not None:
            scratch += (np.zeros(len(table), np.int32),)
        width = spec.entry_coefficient_count
        uniform = ()  # every entry's values, as kernel arguments, when they are the same
        if width:
            uniform = _uniform_values(table, width, live is None)
        on_device = _resident(
            table, segments, device, stream, upload, scratch, capturing,
            width if uniform and uniform[0] else 0,
        )  # fmt: skip
        extra = (*on_device[3:],) if squares else ()  # partials, sums, done
        if spec.from_sums is not None:
            extra += (sums,)
        if live is not None:  # with sums, their count of finished segments serves
            extra += (*live, *(() if squares else (on_device[3],)))
        arguments = (
            *on_device[:3], coefficients, table.formats, table.clear_grads, table.param_store,
            *uniform, *extra,
        )  # fmt: skip
        COUNTS.launches += 1
        with contraction.uncontracted():  # where a launch compiles (`fitted` does first)
            fitted(spec, flags, table, arguments)[blocks, threads, stream](*arguments)
        if not squares:
            return None
        if keep_sums:
            return on_device[4]
        COUNTS.waits += 1
        host = on_device[4].copy_to_host(stream=stream)
        if stream:
            stream.synchronize()
    return host


def _uniform_values(table, width, allowed=True):
    """``(uniform, values)``, the kernel arguments that pass the entries' values (their
    first ``width`` columns) when every entry has the same, bit for bit (and
    ``allowed``): the usual bucket, whose parameters share a step count, so that its
    bias corrections change every step and the table's copy on the GPU does not."""
    values = table.entry_values[:, :width]
    bits = values.view(f"u{values.itemsize}")
    return allowed and bool((bits == bits[0]).all()), tuple(values[0])


def _resident(
    table, segments, device, stream, upload, scratch=(), capturing=False, passed=0
):  # fmt: skip
    """The table's addresses, segments and entry values on the GPU, then the
    ``scratch`` arrays (zeros the kernel leaves zeroed or overwrites: `capturable`'s
    and `sums`'), kept with the table per device, segments and stream: copied once,
    then addresses and entry values again, on ``stream``, only when they differ from
    what was copied last (a planner makes its tables anew when its bucket's layout
    changes; addresses change when a gradient or a staged copy moved, or with a
    stochastic rounding key, every step). The first ``passed`` columns of the entry
    values are not compared: the launch passes them as arguments (`_uniform_values`;
    bias corrections, which change every step), and copies them again with the rest
    once they differ from what the GPU holds.
    A copy after the first lands in the array allocated by the first, in stream order
    after the launches that read it; its host source is pageable memory, which the
    driver has read when the call returns, so the table may be refilled at once.

    While ``capturing`` (a CUDA graph, on ``stream``) the arrays are copied anew into
    arrays of the capture's own: a graph replays each copy it captured, so the host
    copies it reads from stay as they were (``upload`` must make such a copy: the
    torch binding's reads pinned memory, which a graph can capture) and no array
    another launch reads is written."""
    cache = table.__dict__.setdefault("on_device", {})
    # segments are kept by the table, per chunk. A stream of its own per stream: a copy
    # on another stream than the last launch's would not wait for that launch to have
    # read the arrays.
    key = (device, id(segments), _stream_key(stream))
    kept = cache.get(key)
    arrays = (table.addresses, segments, table.entry_values, *scratch)
    if capturing or kept is None or len(kept[1]) != len(arrays):
        kept = cache[key] = [[], []]  # host copies, device arrays
        for array in arrays:
            COUNTS.uploads += 1
            kept[0].append(array.copy())
            kept[1].append(upload(kept[0][-1]))
        return kept[1]
    for k in (0, 2):  # the segments of a table never change, nor the scratch arrays
        array, copied, on_device = arrays[k], kept[0][k], kept[1][k]
        compared = (array[:, passed:], copied[:, passed:]) if k == 2 else (array, copied)
        if compared[0].tobytes() != compared[1].tobytes():  # bits: a sign of zero is a change
            COUNTS.uploads += 1
            copied[...] = array
            on_device.copy_to_device(array, stream=stream)
    return kept[1]


def _stream_key(stream):
    """What tells ``stream`` (a Numba stream, an external one, or 0) apart: its handle."""
    handle = getattr(stream, "handle", stream)
    value = getattr(handle, "value", handle)
    return value if isinstance(value, int) else id(stream)


def launch(
    table, spec, coefficients, flags=(), stream=None, device=None, upload=None, live=None,
    capturing=False, keep_sums=False, sums=None,
):  # fmt: skip
    """`kernels.cpu.launch` on GPU ``device`` (default: the current one), queued on
    ``stream``: a Numba stream, a raw stream handle, or None for the default stream.
    ``upload(array)`` returns a device copy of a small host array, queued on ``stream``.
    Over block-wise 8-bit state, a segment is `config.BLOCKWISE_WARPS` blocks of state,
    and a CUDA block a warp per block (`cuda_blockwise`).
    A capturable ``spec`` (`capturable.capturable`) takes its `capturable.LiveInputs`
    as ``live``; ``capturing``: a CUDA graph is being captured on ``stream``. A spec
    with ``squares`` returns its sums per entry on the host (a wait), or with
    ``keep_sums`` as a device array, which a ``from_sums`` spec takes as ``sums``
    (`kernels.sums`: nothing read on the host)."""
    shape = cuda_blockwise.launch_shape() if spec.blockwise else None
    if spec.capturable != (live is not None):
        raise ValueError(f"{spec.name}: live inputs are for capturable kernels, and needed there")
    if (spec.from_sums is not None) != (sums is not None):
        raise ValueError(f"{spec.name}: sums are for kernels that read them, and needed there")
    return _launch(
        flag_values(spec, flags), table, coefficients, stream, device, upload, shape, spec,
        live, capturing, keep_sums, sums,
    )  # fmt: skip
