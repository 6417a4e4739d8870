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

`vector_store` is the store's counterpart: it writes a tuple of ``count`` computed values
to elements ``i`` to ``i + count − 1`` as ONE aligned store (``st.global.v4.f32``), each
rounded to the array's format as `precision.store` rounds it. A warp's scalar store of
4-byte elements a vector apart writes 4 bytes in every 16 (bench/NOTES.md entry 26);
its vector store writes 512 consecutive bytes.

`vector_store_bits` stores values already in the array's format (a stochastically rounded
parameter's bits, `precision.stochastic_bits`) the same way.

`added` adds two such tuples element by element (Kahan's ``p + c``) and `by_element`
turns a tuple of arrays' tuples into a tuple per element (what `elements.split`'s
``_loads`` returns for each), both on registers, no memory touched.

In Python (Numba's CUDA simulator, tests) each is the plain elementwise version, with
the same values; compiled, overloads make them intrinsics, for the CPU at import and
for CUDA by `register_cuda` (float16 there by ``cvt``, a NaN keeping its bits, as
`precision.load` on a GPU). Compiled to PTX by bench.gpu_static; run on an H200 by
bench.gpu_check (docs/gpu.md).
"""

import functools

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

from .precision import (
    element_size,
    load,
    narrow_bfloat16,
    narrow_float16,
    narrow_float16_keeping_nan,
    store,
    widen_bfloat16,
    widen_float16,
    widen_float16_keeping_nan,
)

# --- Python ---------------------------------------------------------------------------


def vector_load(pointer, i, count):
    """Elements ``i`` to ``i + count − 1`` of ``pointer``, each as `precision.load` reads
    it, as a tuple; compiled, one aligned vector load (module doc)."""
    return tuple(load(pointer, i + k, None) for k in range(count))


def vector_store(pointer, i, values):
    """Store the tuple ``values`` to elements ``i`` to ``i + len(values) − 1`` of
    ``pointer``, each as `precision.store` writes it; compiled, one aligned vector store
    (module doc)."""
    for k, value in enumerate(values):
        store(pointer, i + k, value)


def vector_store_bits(pointer, i, values):
    """`vector_store` of ``values`` already in the array's format (a 16-bit format's
    bits, as `precision.stochastic_bits` gives them), stored as they are."""
    for k, value in enumerate(values):
        pointer[i + k] = value


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


def _vector_store_intrinsic(float32_to_float16=None):
    """The intrinsic of `vector_store`, converting to float16 by ``float32_to_float16``
    (an IR builder: `precision.narrow_float16` or `precision.narrow_float16_keeping_nan`);
    without it, of `vector_store_bits` (values cast to the element type, no rounding to
    a 16-bit format)."""

    @intrinsic
    def vector_store_by_llvm(typingctx, pointer, i, values):
        if not (
            isinstance(pointer, types.CPointer)
            and isinstance(values, types.BaseTuple)
            and all(isinstance(value, (types.Float, types.Integer)) for value in values)
        ):
            return None
        stored = pointer.dtype
        narrow = {types.uint16: narrow_bfloat16, types.int16: float32_to_float16}.get(stored)
        if float32_to_float16 is None:  # bits as they are
            narrow = None
        computed = types.float32 if narrow is not None else stored

        def codegen(context, builder, signature, args):
            element = context.get_value_type(stored)
            size = len(values) * context.get_abi_sizeof(element)
            items = [  # each in the compute type, as `store` takes it, then narrowed
                context.cast(builder, builder.extract_value(args[2], k), value, computed)
                for k, value in enumerate(values)
            ]
            if narrow is not None:
                items = [narrow(builder, item) for item in items]
            if stored.bitwidth == 16 and size % 4 == 0:  # as 32-bit words (`_halves`)
                items = [_word(builder, *items[k : k + 2]) for k in range(0, len(items), 2)]
            vector_type = ir.VectorType(items[0].type, len(items))
            vector = ir.Constant(vector_type, ir.Undefined)
            for k, item in enumerate(items):
                vector = builder.insert_element(vector, item, ir.Constant(ir.IntType(32), k))
            address = builder.bitcast(builder.gep(args[0], [args[1]]), vector_type.as_pointer())
            builder.store(vector, address, align=size)
            return context.get_dummy_value()

        return types.void(pointer, i, values), codegen

    return vector_store_by_llvm


def _word(builder, first, second):
    """The 32-bit word of the 16-bit elements ``first`` (at the lower address) and
    ``second``: `_halves` undone."""
    word = ir.IntType(32)
    high = builder.shl(builder.zext(second, word), ir.Constant(word, 16))
    return builder.or_(builder.zext(first, word), high)


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


def _implementations(float16_to_float32, float32_to_float16):
    """`vector_load`, `vector_store`, `added` and `by_element` overloads, with the given
    float16 conversions (`_vector_load_intrinsic`, `_vector_store_intrinsic`)."""
    load_by_llvm = _vector_load_intrinsic(float16_to_float32)
    store_by_llvm = _vector_store_intrinsic(float32_to_float16)
    return (
        lambda pointer, i, count: lambda pointer, i, count: load_by_llvm(pointer, i, count),
        lambda pointer, i, values: lambda pointer, i, values: store_by_llvm(pointer, i, values),
        lambda pointer, i, values: lambda pointer, i, values: _store_bits(pointer, i, values),
        lambda first, second: lambda first, second: _added_by_llvm(first, second),
        lambda arrays: lambda arrays: _by_element_by_llvm(arrays),
    )


_store_bits = _vector_store_intrinsic()


def _register(overload, implementations):
    """Register ``implementations`` (`_implementations`) with ``overload``."""
    loads, stores, stores_bits, sums, transposed = implementations
    overload(vector_load, prefer_literal=True)(loads)
    overload(vector_store)(stores)
    overload(vector_store_bits)(stores_bits)
    overload(added)(sums)
    overload(by_element)(transposed)


_register(overload, _implementations(widen_float16, narrow_float16))


def register_cuda():
    """Make `vector_load`, `vector_store`, `vector_store_bits`, `added` and `by_element`
    compile for the CUDA target too (needs numba-cuda): float16 by ``cvt``, a NaN keeping its bits
    (`precision.widen_float16_keeping_nan` and `narrow_float16_keeping_nan`, as
    `precision.load` and `store` there)."""
    from numba.cuda.extending import overload as cuda_overload

    implementations = _implementations(widen_float16_keeping_nan, narrow_float16_keeping_nan)
    _register(functools.partial(cuda_overload, target="cuda"), implementations)
