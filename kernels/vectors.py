"""Vector loads: ``count`` consecutive elements of an array in one load instruction.

A CUDA thread that reads 16 bytes of an array as one ``ld.global.v4.f32`` (``.v2.f64``
for float64, ``.v4.u32`` for 8 elements of 16 bits) issues one load where scalar code
issues four to eight, and a warp's load is 512 consecutive bytes. `vector_load` reads
elements ``i`` to ``i + count − 1`` of a typed pointer (`kernels.pointers`) as ONE LLVM
load of ``count·sizeof(T)`` bytes aligned to that many (``<count x T>``; 16-bit elements
as 32-bit words, `_halves`), and returns them as `precision.load` returns each (bfloat16
and float16 converted to float32 by the same branch-free conversions). The alignment is
a promise to the compiler: a misaligned vector load faults (on a GPU, and on the CPU
where LLVM emits an aligned move), so a caller asks `vector_aligned` first, per
segment, and takes scalar loads where it says no (`kernels.cuda._element_loop`).
``count`` must be a literal of the source: it fixes the vector's type at compile time.

`added` adds two such tuples element by element (Kahan's ``p + c``) and `by_element`
turns a tuple of arrays' tuples into a tuple per element (what `elements.split`'s
``_loads`` returns for each), both on registers, no memory touched.

In Python (Numba's CUDA simulator, tests) each is the plain elementwise version, with
the same values; compiled, overloads make them intrinsics, for the CPU at import and
for CUDA by `register_cuda` (float16 there by ``cvt``, a NaN keeping its bits, as
`precision.load` on a GPU). Compiled to PTX by bench.gpu_static; run on an H200 by
bench.gpu_check (docs/gpu.md).
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

from .precision import (
    element_size,
    load,
    widen_bfloat16,
    widen_float16,
    widen_float16_keeping_nan,
)

# --- Python ---------------------------------------------------------------------------


def vector_load(pointer, i, count):
    """Elements ``i`` to ``i + count − 1`` of ``pointer``, each as `precision.load` reads
    it, as a tuple; compiled, one aligned vector load (module doc)."""
    return tuple(load(pointer, i + k, None) for k in range(count))


def added(first, second):
    """The tuple of the sums of ``first``'s and ``second``'s elements, pair by pair."""
    return tuple(a + b for a, b in zip(first, second))


def by_element(arrays):
    """``arrays``, a tuple of equally long tuples (one per array), as a tuple of tuples
    per element: ``((p0, p1), (g0, g1))`` becomes ``((p0, g0), (p1, g1))``."""
    return tuple(zip(*arrays))


@register_jitable
def vector_aligned(address, i, count, pointer):
    """Whether `vector_load` may read ``count`` elements from element ``i`` of the array
    at ``address`` of ``pointer``'s type: its byte address is a multiple of the vector's
    bytes. Address 0 (an array the launch does not use) is."""
    size = element_size(pointer)
    return (address + i * size) % (count * size) == 0


# --- compiled code --------------------------------------------------------------------


def _vector_load_intrinsic(float16_to_float32):
    """The intrinsic of `vector_load`, converting float16 by ``float16_to_float32`` (an
    IR builder: `precision.widen_float16` or `precision.widen_float16_keeping_nan`)."""

    @intrinsic(prefer_literal=True)
    def vector_load_by_llvm(typingctx, pointer, i, count):
        if not (isinstance(pointer, types.CPointer) and isinstance(count, types.IntegerLiteral)):
            return None
        stored = pointer.dtype
        widen = {types.uint16: widen_bfloat16, types.int16: float16_to_float32}.get(stored)
        width = count.literal_value
        computed = types.float32 if widen is not None else stored
        signature = types.UniTuple(computed, width)(pointer, i, count)

        def codegen(context, builder, signature, args):
            element = context.get_value_type(stored)
            size = width * context.get_abi_sizeof(element)
            if stored.bitwidth == 16 and size % 4 == 0:  # as 32-bit words (`_halves`)
                vector = ir.VectorType(ir.IntType(32), size // 4)
            else:
                vector = ir.VectorType(element, width)
            address = builder.bitcast(builder.gep(args[0], [args[1]]), vector.as_pointer())
            loaded = builder.load(address, align=size)
            values = [
                builder.extract_element(loaded, ir.Constant(ir.IntType(32), k))
                for k in range(vector.count)
            ]
            if vector.element != element:
                values = [half for word in values for half in _halves(builder, word)]
            if widen is not None:
                values = [widen(builder, value) for value in values]
            return context.make_tuple(builder, signature.return_type, values)

        return signature, codegen

    return vector_load_by_llvm


def _halves(builder, word):
    """The two 16-bit elements of the 32-bit ``word``, the first at the lower address
    (little-endian) first. 16-bit elements are loaded as words because NVPTX loads a
    ``<8 x i16>`` as two 8-byte ``ld.v4.u16`` (and LLVM folds a vector bitcast of a
    ``<4 x i32>`` load back into that), a ``<4 x i32>`` as one ``ld.v4.u32``."""
    half = ir.IntType(16)
    return builder.trunc(word, half), builder.trunc(
        builder.lshr(word, ir.Constant(word.type, 16)), half
    )


@intrinsic
def _added_by_llvm(typingctx, first, second):
    """`added` of two tuples of one float type and length (an ``fadd`` per pair, as
    ``a + b`` of two such floats compiles without fast-math flags)."""
    if not (
        isinstance(first, types.UniTuple)
        and first == second
        and isinstance(first.dtype, types.Float)
    ):
        return None

    def codegen(context, builder, signature, args):
        sums = [
            builder.fadd(builder.extract_value(args[0], k), builder.extract_value(args[1], k))
            for k in range(first.count)
        ]
        return context.make_tuple(builder, signature.return_type, sums)

    return first(first, second), codegen


@intrinsic
def _by_element_by_llvm(typingctx, arrays):
    """`by_element` of a tuple of equally long tuples."""
    if not isinstance(arrays, types.BaseTuple) or not all(
        isinstance(array, types.UniTuple) and array.count == arrays[0].count for array in arrays
    ):
        return None
    count = arrays[0].count
    element = types.BaseTuple.from_types([array.dtype for array in arrays])
    signature = types.UniTuple(element, count)(arrays)

    def codegen(context, builder, signature, args):
        members = [
            context.make_tuple(
                builder,
                element,
                [builder.extract_value(args[0], [a, k]) for a in range(len(arrays))],
            )
            for k in range(count)
        ]
        return context.make_tuple(builder, signature.return_type, members)

    return signature, codegen


def _implementations(float16_to_float32):
    """`vector_load`, `added` and `by_element` overloads, with the given float16
    conversion (`_vector_load_intrinsic`)."""
    by_llvm = _vector_load_intrinsic(float16_to_float32)
    return (
        lambda pointer, i, count: lambda pointer, i, count: by_llvm(pointer, i, count),
        lambda first, second: lambda first, second: _added_by_llvm(first, second),
        lambda arrays: lambda arrays: _by_element_by_llvm(arrays),
    )


_cpu_vector_load, _cpu_added, _cpu_by_element = _implementations(widen_float16)
overload(vector_load, prefer_literal=True)(_cpu_vector_load)
overload(added)(_cpu_added)
overload(by_element)(_cpu_by_element)


def register_cuda():
    """Make `vector_load`, `added` and `by_element` compile for the CUDA target too
    (needs numba-cuda): float16 by ``cvt``, a NaN keeping its bits
    (`precision.widen_float16_keeping_nan`, as `precision.load` there)."""
    from numba.cuda.extending import overload as cuda_overload

    vector_load_implementation, added_implementation, by_element_implementation = _implementations(
        widen_float16_keeping_nan
    )
    cuda_overload(vector_load, target="cuda", prefer_literal=True)(vector_load_implementation)
    cuda_overload(added, target="cuda")(added_implementation)
    cuda_overload(by_element, target="cuda")(by_element_implementation)
