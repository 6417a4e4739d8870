"""CPU kernels: the rules of `kernels.rules` applied in place over a launch table.

Each kernel steps every entry of a `kernels.tables.TensorTable` (tensors anywhere in
memory, described by address) in one launch: the table's elements are split into one
equal range per thread, each range walking the segments of the entries it covers, so
one huge tensor and many small ones both use every thread. Tables shorter than
``config.CPU_SERIAL_BELOW`` elements run on the calling thread. Coefficients come as a
tuple in the arrays' dtype (built by `kernels.hyperparameters`).

Each loop is compiled in variants (`_compiled`): threaded or serial, and with the flags
that shape its inner loop (``AMSGRAD``, ``NESTEROV``; ``CLEAR_GRADS`` and ``PARAM_STORE``,
the table's ``clear_grads`` and ``param_store``) as compile-time constants, and SGD's
per-entry first step as one loop per case, so that LLVM vectorises every loop. Given
as runtime values, such flags stay inside the loop once 16-bit conversions make it too
big to split on them (one thread, 4M elements, bfloat16 Adam: 21 ms against 2.5 ms; 2
threads, 16M elements, bfloat16 SGD: 6.9 against 3.5 ms); ``numba.literally`` would fix
them too, but its re-dispatched loops ran 15× slower.

Every loop compiles with Numba's NumPy error model: a division by zero gives IEEE's
±inf or NaN, as torch does, where the default (Python's) model would raise
``ZeroDivisionError`` half-way through the arrays (Adam with ``eps = 0`` and a zero
gradient).
"""

import functools
import os
import types
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange  # noqa: F401 (prange: the generated loops)
from numba.np.ufunc import parallel

from . import config, generated
from .elements import element, segment_source
from .pointers import pointer_to, prefetch, prefetch_to_l2  # noqa: F401 (the generated loops)
from .quantization import (  # noqa: F401 (the generated loops)
    ABSMAX_ZERO,
    BLOCK,
    SIGNED_CODE_ZERO,
    UNSIGNED_CODE_ZERO,
    encode_signed,
    encode_unsigned,
    float_of_bits,
    inverse,
    magnitude_bits,
)
from .tables import KAHAN, NEAREST  # noqa: F401 (KAHAN: the generated loops)

#: Compile-time constants of each compiled variant of the loops (`_compiled`); a rule's
#: flags (`specs.KernelSpec.flags`, upper-cased: ``NESTEROV``, ``AMSGRAD``) are too.
CLEAR_GRADS = False
PARAM_STORE = NEAREST
NESTEROV = False
PREFETCH = False

#: With PREFETCH (16-bit arrays), a loop walks its segment in chunks of CHUNK elements
#: and asks for the cache lines AHEAD elements on before each chunk (see `_compiled`).
CHUNK = 64
AHEAD = 2048

#: A loop that sums squares (`specs.KernelSpec.squares`) sums each chunk of SQUARES_CHUNK
#: elements of an entry in the computing dtype (in smaller pieces added in float64 where
#: it prefetches, or over 8-bit state's blocks) and stores that chunk's float64 sum by
#: the chunk's index among the table's chunks; `_launch` adds each entry's chunk sums in
#: chunk order. So an entry's sums are the same bits however a table is cut among
#: threads, and whatever else the table holds (a bucket of the step in backward against
#: the whole model): adding float64 sums per segment, then the segments', made LAMB's
#: float64 parameters differ from the ordinary step's in the last bit (a 512×512 layer).
#: Summing float64 values per element made LLVM vectorise the whole loop at float64's
#: width, half float32's (LAMB's direction pass, 2 threads, 2^24 float32 elements: 11.3
#: ms against 10.0; its sums differ by 1e-9 relative); a scratch array per chunk summed
#: in a loop of its own was no faster than that.
SQUARES_CHUNK = 2048


def loop(spec):
    """The CPU loop of ``spec`` (a `specs.KernelSpec`), generated once from `loop_source`: the
    rule's element step (`elements.element`) over every segment of a launch table.

    The loop walks its part's segments; per segment it makes a typed pointer per array
    and reads the entry's values and entry flags, then steps the elements, in chunks of
    `CHUNK` with a software prefetch `AHEAD` elements on when ``PREFETCH`` (else one
    chunk), with one inner loop per combination of entry flags. Over block-wise 8-bit
    state (`specs.int8_blockwise`) it steps one block of `BLOCK` elements at a time
    (`_blockwise_loop_source`).
    """
    return _generated_loop(spec)[0]


@functools.cache
def _generated_loop(spec):
    """The loop, compiled under a file of its own (`generated`), and whether Numba may
    cache what is compiled from it."""
    namespace = {**globals(), "ELEMENT": element(spec)}
    cacheable = generated.compile_into(namespace, "cpu", spec, loop_source(spec))
    return namespace[f"_{spec.name}"], cacheable


def loop_source(spec):
    """The source of `loop` (readable: ``print(loop_source(rules.adam.SPEC))``)."""
    if spec.blockwise:
        return _blockwise_loop_source(spec)
    lines = _loop_head(spec)
    whole = "SQUARES_CHUNK" if spec.squares else "max(end - begin, 1)"
    lines += [
        f"            reach = CHUNK if PREFETCH else {whole}",
        "            for chunk in range(begin, end, reach):",
        "                if PREFETCH:",
        "                    ahead = min(chunk + AHEAD, end - 1)",
    ]
    for name in ("param", "grad", *_always(spec)):
        lines.append(f"                    prefetch({name}, ahead)")
    lines += [
        "                    if PARAM_STORE == KAHAN:",
        "                        prefetch(companion, ahead)",
    ]
    lines.append("                stop = min(chunk + reach, end)")
    sums = range(len(spec.squares))  # per chunk in the computing dtype (SQUARES_CHUNK)
    lines += [f"                chunk_sum{k} = zero" for k in sums]
    lines += _cases(spec, spec.entry_flags, (), "                ")
    lines += [f"                sum{k} += np.float64(chunk_sum{k})" for k in sums]
    lines += _chunk_sums_stored(spec, "                ")
    return "\n".join(lines) + "\n"


def _loop_head(spec):
    """A loop's lines down to its segment's set-up (`elements.segment_source`)."""
    partials = ", first_chunk, partials" if spec.squares else ""
    lines = [
        f"def _{spec.name}(addresses, segments, part_starts, entry_values, coefficients, "
        f"formats{partials}):",
        "    stored_param, stored_grad, stored_state, stored_companion = formats",
        "    last = addresses.shape[1] - 1  # the companion column, unless NEAREST",
        "    for part in prange(part_starts.size - 1):",
    ]
    if spec.blockwise and spec.written:  # one block's new state values, per state
        lines.append(f"        new_values = np.empty(({len(spec.written)}, BLOCK), np.float32)")
    if spec.squares:  # a zero in the computing dtype
        lines.append("        zero = np.zeros(1, entry_values.dtype)[0]")
    return lines + [
        "        for segment in range(part_starts[part], part_starts[part + 1]):",
        "            entry, begin = segments[segment, 0], segments[segment, 1]",
        "            end = segments[segment, 2]",
        *segment_source(spec, "            "),
    ]


def _chunk_sums_stored(spec, indent):
    """After the elements up to ``stop``: where they end a chunk of `SQUARES_CHUNK` (or
    the entry), the chunk's sums of squares stored by its index among the table's
    chunks (``first_chunk[entry]``: the entry's first), and set to zero again.
    Segments start at chunk boundaries and end at one or at their entry's end."""
    if not spec.squares:
        return []
    lines = [
        "if stop == end or stop % SQUARES_CHUNK == 0:",
        "    at = first_chunk[entry] + (stop - 1) // SQUARES_CHUNK",
    ]
    for k in range(len(spec.squares)):
        lines += [f"    partials[at, {k}] = sum{k}", f"    sum{k} = 0.0"]
    return [indent + line for line in lines]


def _always(spec):
    """The state arrays a step always reads (not `specs.KernelSpec.optional`)."""
    return [name for name in spec.state if spec.optional_flag(name) is None]


def _cases(spec, entry_flags, known, indent):
    """The inner loops, one per value of each entry flag (runtime flags inside a loop
    keep it from vectorising)."""
    if entry_flags:
        flag, rest = entry_flags[0], entry_flags[1:]
        return [
            f"{indent}if {flag}:",
            *_cases(spec, rest, (*known, "True"), indent + "    "),
            f"{indent}else:",
            *_cases(spec, rest, (*known, "False"), indent + "    "),
        ]
    absmax = [f"{name}_before" for name in spec.state if spec.blockwise]
    arguments = ["i", "param", "grad", *spec.state, *absmax, "coefficients", "values"]
    arguments += [flag.upper() for flag in spec.flags]
    arguments += [*known, "CLEAR_GRADS", "companion", "PARAM_STORE", "key"]
    call = f"ELEMENT({', '.join(arguments)})"
    if spec.blockwise:
        return _blockwise_elements(spec, call, indent)
    if not spec.squares:
        return [f"{indent}for i in range(chunk, stop):", f"{indent}    {call}"]
    lines = [f"{indent}for i in range(chunk, stop):", f"{indent}    summed = {call}"]
    for k in range(len(spec.squares)):
        lines.append(f"{indent}    chunk_sum{k} += summed[{k}] * summed[{k}]")
    return lines


# --- block-wise 8-bit state -----------------------------------------------------------


def _blockwise_loop_source(spec):
    """`loop_source` over block-wise 8-bit state (`specs.int8_blockwise`). Segments
    start at block boundaries, so each block is one thread's, in two passes: the step
    of its elements, keeping their new state values and each state's largest magnitude
    (as integer bits: a running integer maximum vectorises), then their codes on the
    new absmax. The block ``AHEAD`` elements on is prefetched into the second-level
    cache (`pointers.prefetch_to_l2`), whatever ``PREFETCH`` says: worth 40% on the
    Xeon (bench/NOTES.md entry 17); into the first level it cost 15-25% on AMD EPYC
    (entry 23)."""
    lines = _loop_head(spec)
    lines += [
        "            for start in range(begin, end, BLOCK):",
        "                stop, block = min(start + BLOCK, end), start // BLOCK",
        "                ahead = min(start + AHEAD, end - 1)",
        "                for line in range(ahead, min(ahead + BLOCK, end), 16):  # 64-byte lines",
        "                    prefetch_to_l2(param, line)",
        "                    prefetch_to_l2(grad, line)",
        "                for line in range(ahead, min(ahead + BLOCK, end), 64):",
        *[f"                    prefetch_to_l2({name}, line)" for name in _always(spec)],
    ]
    for name in spec.state:  # the block's absmax before the step
        before = f"{name}_absmax[block]"
        flag = spec.optional_flag(name)
        if flag:
            before = f"{before} if {flag.upper()} else ABSMAX_ZERO"
        lines.append(f"                {name}_before = {before}")
    lines += [f"                top{k} = np.int32(0)" for k in range(len(spec.written))]
    sums = range(len(spec.squares))  # per block in the computing dtype
    lines += [f"                chunk_sum{k} = zero" for k in sums]
    lines += _cases(spec, spec.entry_flags, (), "                ")
    lines += [f"                sum{k} += np.float64(chunk_sum{k})" for k in sums]
    lines += _blockwise_codes(spec, "                ")
    lines += _chunk_sums_stored(spec, "                ")
    return "\n".join(lines) + "\n"


def _guarded(spec, name, lines, indent):
    """``lines`` at ``indent``, under ``if FLAG:`` for an optional state ``name``."""
    flag = spec.optional_flag(name)
    if flag is None:
        return [indent + line for line in lines]
    return [f"{indent}if {flag.upper()}:", *(f"{indent}    {line}" for line in lines)]


def _blockwise_elements(spec, call, indent):
    """A block's first pass: the element steps, their new state values and maxima."""
    written = spec.written
    lines = [f"{indent}for i in range(start, stop):"]
    lines.append(f"{indent}    new = {call}" if written or spec.squares else f"{indent}    {call}")
    for k, name in enumerate(written):
        kept = [f"new_values[{k}, i - start] = new[{k}]"]
        kept.append(f"top{k} = max(top{k}, magnitude_bits(new[{k}]))")
        lines += _guarded(spec, name, kept, indent + "    ")
    for k in range(len(spec.squares)):
        j = len(written) + k
        lines.append(f"{indent}    chunk_sum{k} += new[{j}] * new[{j}]")
    return lines


def _blockwise_codes(spec, indent):
    """A block's second pass: each written state's new absmax, then its codes."""
    written = spec.written
    if not written:
        return []
    lines = []
    for k, name in enumerate(written):
        lines.append(f"{indent}absmax{k} = float_of_bits(top{k})")
        lines += _guarded(spec, name, [f"{name}_absmax[block] = absmax{k}"], indent)
        lines.append(f"{indent}inverse{k} = inverse(absmax{k})")
    lines.append(f"{indent}for i in range(start, stop):")
    for k, name in enumerate(written):
        code = f"{name}[i] = encode_{spec.code_kind(name)}(new_values[{k}, i - start], inverse{k})"
        lines += _guarded(spec, name, [code], indent + "    ")
    return lines


@functools.cache
def _compiled(loop, cacheable, threaded, clear_grads, param_store, flags, prefetch_ahead, fastmath):
    """``loop`` compiled threaded or not (with Numba's on-disk cache if ``cacheable``),
    with its flags as constants, under a cache name of its own (`CLEAR_GRADS`,
    `PARAM_STORE`, and ``flags``: ``(NAME, value)`` pairs such as ``("AMSGRAD", True)``).

    Serial variants exist because waking the thread pool costs more than short arrays
    take: 64 elements 0.8 µs serial against 4.1 µs parallel, 32k elements 4.4 against
    7.0 µs, 256k 45 against 35 µs. ``prefetch_ahead`` (tables with 16-bit arrays):
    streaming 16-bit arrays from memory, the hardware prefetcher alone left bfloat16 SGD
    on 2^24 elements at 22-29 GB/s (fp32: 53-59); with a software prefetch 2048
    elements ahead per 64-element chunk, 53-63 GB/s (2.65-3.2 against 5.8 ms). For fp32
    it looked slower in separate runs (7.3 against 6.0 ms), which may have been the
    benchmark's allocation order (see bench/NOTES.md entry 16); it stays off there until
    measured in one process. Without prefetching a segment is one chunk. The loops read
    the variant's constants themselves: a helper function would see this module's (the
    first version chunked nothing that way).
    """
    name = f"{loop.__name__}_clear{int(clear_grads)}_store{int(param_store)}"
    name += f"_prefetch{int(prefetch_ahead)}"
    constants = {"CLEAR_GRADS": clear_grads, "PARAM_STORE": param_store}
    constants["PREFETCH"] = prefetch_ahead
    for flag, value in flags:
        name += f"_{flag.lower()}{int(value)}"
        constants[flag] = value
    name += "" if threaded else "_serial"
    variant = types.FunctionType(loop.__code__, {**loop.__globals__, **constants}, name)
    variant.__qualname__ = name
    options = {"cache": cacheable, "error_model": "numpy"}
    if fastmath:
        options["fastmath"] = set(fastmath)
    return njit(parallel=threaded, **options)(variant)


#: Set in a fork()ed child: its OpenMP runtime is the parent's, which is not fork-safe
#: (measured: Numba's parallel loop in such a child hangs when the parent ran torch ops
#: on threads, and Numba raises SIGTERM when the parent ran Numba's). A forked child
#: (a Hogwild worker) therefore runs the single-threaded loops.
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads():
    """``numba.get_num_threads()`` without the process-wide lock it takes to start the
    pool (≈3 µs a call, as much as a small kernel): once started, read the count."""
    count = parallel._get_num_threads() if parallel._is_initialized else 0
    return count if count > 0 else numba.get_num_threads()


@functools.cache
def _sixteen_bits(formats):
    """Whether a table's arrays include 16-bit ones (bfloat16, float16)."""
    return any(kind.itemsize == 2 for kind in formats)


class _Variant(NamedTuple):
    """What `launch` needs of a spec and its flags' values, worked out once."""

    spec: object  # the `specs.KernelSpec`
    loop: object  # its generated loop (`loop`)
    cacheable: bool  # whether Numba may cache it on disk (`generated.compile_into`)
    flags: tuple  # ``(NAME, value)`` pairs: the flags as compile-time constants
    block: int  # segments start at multiples of it (`tables.TensorTable.cpu_schedule`)
    fastmath: tuple  # LLVM fast-math flags
    squares: int  # how many sums of squares it returns per entry


def _launch(variant, table, coefficients):
    """Run ``variant``'s loop over ``table``; with sums of squares, return them per
    entry (float64, shape ``(entries, squares)``)."""
    squares = variant.squares
    if table.size == 0:
        return np.zeros((len(table), squares)) if squares else None
    # A sum of squares always runs threaded: the serial loop vectorises its float32 chunk
    # sums in another order, so LAMB's norms (and trust ratios) of a small bucket of the
    # step in backward would differ in the last bit from the ordinary step's large one.
    threaded = (table.size >= config.CPU_SERIAL_BELOW or squares > 0) and not _forked
    prefetch_ahead = _sixteen_bits(table.formats)
    kernel = _compiled(
        variant.loop, variant.cacheable, threaded, table.clear_grads, table.param_store,
        variant.flags, prefetch_ahead, variant.fastmath,
    )  # fmt: skip
    segments, part_starts = table.cpu_schedule(_threads() if threaded else 1, variant.block)
    if not squares:
        kernel(
            table.addresses, segments, part_starts, table.entry_values, coefficients, table.formats
        )
        return None
    first_chunk, chunk_entries = table.blocks(SQUARES_CHUNK)
    partials = np.zeros((chunk_entries.size, squares))
    kernel(
        table.addresses, segments, part_starts, table.entry_values, coefficients, table.formats,
        first_chunk, partials,
    )  # fmt: skip
    sums = np.zeros((len(table), squares))
    np.add.at(sums, chunk_entries, partials)  # in index order: each entry's chunks in order
    return sums


def launch(table, spec, coefficients, flags=()):
    """Apply ``spec``'s rule (a `specs.KernelSpec`) in place over ``table``, whose columns are
    param, grad and ``spec.state`` (8-bit state: its codes, then its absmax, as
    `specs.int8_blockwise` says); ``coefficients``: its ``spec.coefficients`` as a
    plain tuple in the table's dtype (`kernels.hyperparameters`), ``flags`` the values
    of ``spec.flags``, in order. Returns the per-entry sums of ``spec.squares`` (a
    float64 array), or None."""
    variant = _variants.get((spec.name, flags))
    if variant is None or variant.spec is not spec:
        variant = _variant(spec, flags)
    return _launch(variant, table, coefficients)


def _variant(spec, flags):
    """Work out (once per spec and flags: a launch costs ≈1 µs less) and keep
    ``spec``'s `_Variant`; two different specs of one name are an error."""
    known = _variants.get((spec.name, flags))
    if known is not None and known.spec != spec:
        raise ValueError(f"two different KernelSpecs are named {spec.name!r}")
    loop, cacheable = _generated_loop(spec)
    # A loop that sums squares (LAMB's norms) compiles afresh in every process: loaded
    # from Numba's on-disk cache, the same threaded loop returned float32 chunk sums an
    # ulp apart from a fresh compile's (every time, for the same arrays; the serial loop
    # did not), so a trust ratio depended on which process had compiled the loop first
    # (bench/NOTES.md entry 24). The cost: about a second per variant and process.
    cacheable = cacheable and not spec.squares
    constants = tuple((name.upper(), bool(value)) for name, value in zip(spec.flags, flags))
    # segments start at block boundaries; a sum of squares at a chunk boundary (a
    # multiple of BLOCK), so that its chunks, and their sums, do not depend on how the
    # table is split among threads (a bucket of the step in backward, a shard: the same
    # sums)
    block = SQUARES_CHUNK if spec.squares else BLOCK if spec.blockwise else 1
    fastmath = tuple(sorted(spec.fastmath))
    variant = _Variant(spec, loop, cacheable, constants, block, fastmath, len(spec.squares))
    _variants[(spec.name, flags)] = variant
    return variant


#: `_Variant` per (spec name, flags' values).
_variants = {}
