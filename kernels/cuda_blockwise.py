"""CUDA kernels over block-wise 8-bit state (`specs.int8_blockwise`): a warp per block
of state, `PER_LANE` elements per thread, imported by `kernels.cuda` (whose `kernel`
and `launch` take every spec).

The shape. A CUDA block has `config.BLOCKWISE_WARPS` warps (2: 64 threads) and a
segment as many blocks of `quantization.BLOCK` elements of one entry: warp ``w`` takes
the segment's block ``w``, lane ``l`` its elements ``l + 32·k`` (k < 8), so that each
warp load is 32 consecutive elements. In a whole block a thread loads all 8 elements of
every array (`split`: param, grad, each state's code decoded on the block's old absmax)
before it computes and stores the first, so it has 8 elements of each array in flight
(5-10 bytes each, 40-80 bytes) where a thread per element had one. A launch that
stores by Kahan summation (``param_store``, an argument of the kernel) reads a
compensation array more and takes them 4 at a time: the kernel's registers are those
of its heaviest path. An optional state's flag (RMSprop's ``centered``) is a constant
of the kernel (`kernels.cuda`), so its arrays are held 8 at a time in a kernel of their
own (4 at a time held RMSprop's centered kernels at 17-21 KB in flight per SM on sm_90,
below the target; 8 at a time, 35-36 KB). The entry's last block, when shorter, takes
one element at a time (`elements.element`) under a test of its index. A block's new
absmax per state is its elements' largest magnitude (`nan_max`: a NaN is kept): each
lane's over its 8 values, then the warp's by `shuffle_xor`, a butterfly after which
every lane holds it; no shared memory, no barrier. Each lane then encodes its values on it.

LAMB's sums of squares (`specs.KernelSpec.squares`, float64): each lane's over its
elements in order, the warp's by the same butterfly, then the segment's by thread 0
over the warps in order (shared memory, one barrier) into ``partials`` (`kernels.sums`):
one order at every launch, so the same bits every time. The CPU loop sums float32
squares per block in float32: the two agree to rounding (tests: 1e-6 relative).

Why this shape (bench.gpu_static; targets 12.9 KB in flight per SM on sm_80, 24.9 KB
on sm_90): with 8 elements a thread the 8-bit kernels take 40-110 registers, 9-25
blocks of 64 threads per SM, 25-113 KB in flight (were 5-10 bytes a thread, 5-18 KB).
Blocks of 256 threads lose warps to rounding (Adam on bfloat16, 96-100 registers: 2
blocks, 24.0 KB on sm_90). Blocks of one warp would gain at most one warp per SM, and
their segments of one block of state would leave the CUDA block that adds an entry's
partial sums of squares (`kernels.sums`, LAMB) twice as many per thread as blocks of
two (which have twice as many per thread as the old 256 threads over segments of 256
elements). A warp looping over several blocks of a longer segment took 20-40 more
registers. 4 elements a thread (64 threads per block of state) would give 16-bit Adam
24 bytes a thread and need a barrier per reduction.

In Numba's CUDA simulator, which has no shuffles, `shuffle_xor` exchanges values
through an array of the launch between two barriers of the whole block: every thread
of a block calls it as often, as the generated kernels do (the tests run them there).
`config.BLOCKWISE_WARPS` must be a power of two (`kernels.sums` adds an entry's partial
sums by halving the block's threads).
"""

import functools

from numba import config as numba_config
from numba import cuda
from numba.extending import register_jitable

from . import config, generated
from .elements import _loads, _namespace, _update, element
from .quantization import BLOCK
from .tables import KAHAN

#: Lanes of a warp: the lanes of a block of state.
LANES = 32
#: Elements per thread: a block of state over a warp's lanes.
PER_LANE = BLOCK // LANES
#: The most warps a CUDA block has (1024 threads): the size of the shared sums.
MOST_WARPS = 32
_ALL_LANES = 0xFFFFFFFF

if numba_config.ENABLE_CUDASIM:
    import threading

    import numpy as np
    from numba.cuda.simulator.kernel import _get_kernel_context

    _exchanges = {}  # of the launch (its fake CUDA module): a value per thread of a block
    _exchanges_lock = threading.Lock()

    def shuffle_xor(value, lane_mask):
        """``value`` of the lane ``lane ^ lane_mask`` (simulated: module doc)."""
        context = _get_kernel_context()
        exchanged = _exchanges.get(context)
        if exchanged is None:
            with _exchanges_lock:  # one array, made by the first thread to get here
                if context not in _exchanges:
                    _exchanges.clear()  # an earlier launch's
                    _exchanges[context] = np.empty(1024, object)
                exchanged = _exchanges[context]
        thread = threading.current_thread()
        index = thread.threadIdx.x
        exchanged[index] = value
        thread.syncthreads()
        other = exchanged[index ^ lane_mask]
        thread.syncthreads()  # before a later call overwrites it
        return other

else:

    @register_jitable
    def shuffle_xor(value, lane_mask):
        """``value`` of the lane ``lane ^ lane_mask`` of this warp (every lane calls it)."""
        return cuda.shfl_xor_sync(_ALL_LANES, value, lane_mask)


def launch_shape():
    """``(elements per segment, threads per CUDA block)`` of a block-wise launch:
    `config.BLOCKWISE_WARPS` warps a CUDA block, a warp per block of state."""
    return config.BLOCKWISE_WARPS * BLOCK, config.BLOCKWISE_WARPS * LANES


def split(spec):
    """The element step of block-wise ``spec`` in two generated functions, as
    `elements.split` for other specs::

        <name>_loads(i, param, grad, *state, *absmax, coefficients, *flags, companion,
                     param_store)
        <name>_update(i, loaded, param, grad, coefficients, entry, *flags, *entry_flags,
                      clear_grad, companion, param_store, key)

    ``_loads`` returns element ``i``'s param, grad and each state decoded on its
    block's ``absmax`` (values, as `elements.element` takes them); ``_update`` computes
    the rule on them, stores the param (and clears the gradient), and returns what
    `elements.element` returns: the new value of each written state, then the values
    to square."""
    return _generated_split(spec)


@functools.cache
def _generated_split(spec):
    namespace = _namespace(spec)
    generated.compile_into(namespace, "element_blockwise", spec, split_source(spec))
    return namespace[f"{spec.name}_loads"], namespace[f"{spec.name}_update"]


def split_source(spec):
    """The source of `split` (readable: ``print(split_source(int8_blockwise(SPEC)))``)."""
    if not spec.blockwise:
        raise ValueError(f"{spec.name}: not block-wise (`elements.split`)")
    absmax = [f"{name}_absmax" for name in spec.state]
    loads = ["i", "param", "grad", *spec.state, *absmax, "coefficients", *spec.flags]
    loads += ["companion", "param_store"]
    read, values = _loads(spec)
    names = [f"loaded{k}" for k in range(len(values))]
    update = ["i", "loaded", "param", "grad", "coefficients", "entry", *spec.flags]
    update += [*spec.entry_flags, "clear_grad", "companion", "param_store", "key"]
    lines = [
        "@register_jitable",
        f"def {spec.name}_loads({', '.join(loads)}):",
        "    like = coefficients[0]",
        *read,
        f"    return ({', '.join(values)},)",
        "",
        "",
        "@register_jitable",
        f"def {spec.name}_update({', '.join(update)}):",
        f"    {', '.join(names)}, = loaded",
    ]
    return "\n".join(lines + _update(spec, names, names[0]) + [""])


def namespace(spec):
    """What `kernel_source`'s kernel refers to beyond `kernels.cuda`'s globals."""
    loads, update = split(spec)
    return {
        "ELEMENT": element(spec),
        "LOADS": loads,
        "UPDATE": update,
        "shuffle_xor": shuffle_xor,
        "KAHAN": KAHAN,
        "LANES": LANES,
        "MOST_WARPS": MOST_WARPS,
    }


def kernel_source(spec, head, epilogue):
    """`kernels.cuda.kernel_source` of block-wise ``spec``; ``head(spec, shared)`` gives
    the kernel's lines down to its segment's set-up, ``epilogue(spec, indent)`` those
    after a segment's sums are in ``partials`` (`kernels.sums`)."""
    written, squared = range(len(spec.written)), range(len(spec.squares))
    shared = [f"    square{k} = cuda.shared.array(MOST_WARPS, float64)" for k in squared]
    shared += [
        "    thread = cuda.threadIdx.x",
        "    lane, warp = thread % LANES, thread // LANES",
    ]
    lines = head(spec, shared)
    lines += [
        "        begin, end = segments[segment, 1], segments[segment, 2]",
        "        start = begin + warp * BLOCK  # the warp's block of state",
        "        block, whole = start // BLOCK, start + BLOCK <= end",
    ]
    indent = "        "
    for name in spec.state:  # the block's absmax before the step, unread for none
        test = " and ".join(filter(None, ["start < end", spec.optional_flag(name)]))
        lines.append(f"{indent}{name}_before = {name}_absmax[block] if {test} else ABSMAX_ZERO")
    lines += [f"{indent}top{k} = ABSMAX_ZERO" for k in written]
    lines += [
        f"{indent}i{k} = start + lane" + (f" + {LANES * k}" if k else "") for k in range(PER_LANE)
    ]
    lines += [f"{indent}new{w}_{k} = ABSMAX_ZERO" for w in written for k in range(PER_LANE)]
    lines += [f"{indent}if whole:  # every element loaded before the first is stored"]
    lines += _whole_steps(spec, indent + "    ")
    lines += [f"{indent}else:  # the entry's last block, shorter (or none): one at a time"]
    lines += _ragged_steps(spec, indent + "    ")
    lines += _maxima(spec, indent)
    lines += _codes(spec, indent)
    lines += _sums(spec, "        ")
    lines += epilogue(spec, "        ")
    return "\n".join(lines) + "\n"


def _flags(spec):
    return [*spec.flags, *spec.entry_flags]


def _kept(spec, k, indent):
    """Lines that keep element ``k``'s new state values (``new``) and add them to the
    lane's maxima and sums of squares."""
    lines = []
    for w in range(len(spec.written)):
        lines.append(f"{indent}new{w}_{k} = new[{w}]")
        lines.append(f"{indent}top{w} = nan_max(top{w}, abs(new[{w}]))")
    for s in range(len(spec.squares)):
        lines.append(f"{indent}value = float64(new[{len(spec.written) + s}])")
        lines.append(f"{indent}sum{s} += value * value")
    return lines


def _returns(spec):
    return bool(spec.written or spec.squares)


def _whole_steps(spec, indent):
    """A whole block: each lane's 8 elements loaded, then stepped in order; 4 at a time
    where the launch stores by Kahan summation (module doc)."""
    halves = range(PER_LANE // 2), range(PER_LANE // 2, PER_LANE)
    lines = [f"{indent}if param_store == KAHAN:  # fewer registers for the compensation"]
    for half in halves:
        lines += _steps(spec, half, indent + "    ")
    return lines + [f"{indent}else:", *_steps(spec, range(PER_LANE), indent + "    ")]


def _steps(spec, members, indent):
    """The element steps of ``members`` (of the lane's 8): all loaded, then stepped."""
    before = [f"{name}_before" for name in spec.state]
    loads = ["param", "grad", *spec.state, *before, "coefficients", *spec.flags]
    loads = ", ".join([*loads, "companion", "param_store"])
    update = ["param", "grad", "coefficients", "values", *_flags(spec), "clear"]
    update = ", ".join([*update, "companion", "param_store", "key"])
    lines = [f"{indent}loaded{k} = LOADS(i{k}, {loads})" for k in members]
    for k in members:
        call = f"UPDATE(i{k}, loaded{k}, {update})"
        lines.append(f"{indent}{'new = ' if _returns(spec) else ''}{call}")
        lines += _kept(spec, k, indent)
    return lines


def _ragged_steps(spec, indent):
    """A shorter block (or none): each element in the segment, one at a time."""
    before = [f"{name}_before" for name in spec.state]
    arguments = ["param", "grad", *spec.state, *before, "coefficients", "values"]
    arguments = ", ".join([*arguments, *_flags(spec), "clear", "companion", "param_store", "key"])
    lines = []
    for k in range(PER_LANE):
        lines.append(f"{indent}if i{k} < end:")
        call = f"ELEMENT(i{k}, {arguments})"
        lines.append(f"{indent}    {'new = ' if _returns(spec) else ''}{call}")
        lines += _kept(spec, k, indent + "    ")
    return lines


def _maxima(spec, indent):
    """Each written state's largest magnitude over the warp's block (every lane ends
    with it): a butterfly of shuffles."""
    if not spec.written:
        return []
    lines = [f"{indent}width = LANES // 2", f"{indent}while width > 0:"]
    for w in range(len(spec.written)):
        lines.append(f"{indent}    top{w} = nan_max(top{w}, shuffle_xor(top{w}, width))")
    return lines + [f"{indent}    width //= 2"]


def _sums(spec, indent):
    """The segment's sums of squares: each lane's, the warp's by a butterfly, then the
    warps' in warp order (thread 0, into ``partials``)."""
    squared = range(len(spec.squares))
    if not spec.squares:
        return []
    lines = [f"{indent}width = LANES // 2", f"{indent}while width > 0:"]
    lines += [f"{indent}    sum{s} += shuffle_xor(sum{s}, width)" for s in squared]
    lines += [f"{indent}    width //= 2", f"{indent}if lane == 0:"]
    lines += [f"{indent}    square{s}[warp] = sum{s}" for s in squared]
    lines += [
        f"{indent}cuda.syncthreads()  # every warp's sums are in shared memory",
        f"{indent}if thread == 0:",
    ]
    for s in squared:
        lines += [
            f"{indent}    total = 0.0",
            f"{indent}    for other in range(cuda.blockDim.x // LANES):",
            f"{indent}        total += square{s}[other]",
            f"{indent}    partials[segment, {s}] = total",
        ]
    return lines


def _codes(spec, indent):
    """Each written state's codes on its block's new absmax, and (lane 0) that absmax."""
    lines = []
    for w, name in enumerate(spec.written):
        flag = spec.optional_flag(name)
        inner = indent + ("    " if flag else "")
        lines += [f"{indent}if {flag}:"] if flag else []
        encode = f"encode_{spec.code_kind(name)}"
        lines += [f"{inner}inverse{w} = inverse(top{w})", f"{inner}if whole:"]
        for k in range(PER_LANE):
            lines.append(f"{inner}    {name}[i{k}] = {encode}(new{w}_{k}, inverse{w})")
        lines.append(f"{inner}else:")
        for k in range(PER_LANE):
            lines += [
                f"{inner}    if i{k} < end:",
                f"{inner}        {name}[i{k}] = {encode}(new{w}_{k}, inverse{w})",
            ]
        lines.append(f"{inner}if lane == 0 and start < end:")
        lines.append(f"{inner}    {name}_absmax[block] = top{w}")
    return lines
