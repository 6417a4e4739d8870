"""Values stored in 16 bits and computed in float32: bfloat16 and float16 elements.

NumPy has no bfloat16, so 16-bit floats travel through the kernels as 16-bit integers
holding their bits: ``np.uint16`` for bfloat16 and ``np.int16`` for float16 (the two
integer types only tell the formats apart). `load` reads element ``i`` of a pointer (or
array) as the compute type and `store` writes a computed value back, rounded to the
nearest representable value, ties to even, NaN kept NaN, as torch rounds
(``c10::BFloat16``, ``c10::Half``). For float32 and float64 elements both are plain
indexing, and compile to exactly that.

In compiled code (`kernels.cpu`, `kernels.cuda`) the conversions are integer arithmetic
on the bits; in Python (Numba's CUDA simulator, references in tests) NumPy does them.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

#: The integer type that carries each 16-bit float format's bits.
BFLOAT16_BITS = np.uint16
FLOAT16_BITS = np.int16


# --- Python ---------------------------------------------------------------------------


def load(pointer, i, like):
    """Element ``i`` of ``pointer`` as ``like``'s type (float32 for 16-bit formats)."""
    value = pointer[i]
    kind = np.asarray(pointer).dtype
    if kind == BFLOAT16_BITS:
        return bfloat16_bits_to_float32(value)
    if kind == FLOAT16_BITS:
        return np.float32(np.asarray(value, FLOAT16_BITS).view(np.float16))
    return value


def store(pointer, i, value):
    """Write ``value`` to element ``i`` of ``pointer``, rounded to its format."""
    kind = np.asarray(pointer).dtype
    if kind == BFLOAT16_BITS:
        pointer[i] = float32_to_bfloat16_bits(value)
    elif kind == FLOAT16_BITS:
        with np.errstate(over="ignore"):  # beyond float16's range: inf, as torch
            pointer[i] = np.asarray(np.float16(value)).view(FLOAT16_BITS)
    else:
        pointer[i] = value


def bfloat16_bits_to_float32(bits):
    """The float32 value of bfloat16 ``bits`` (exact: bfloat16 is float32's top half)."""
    return np.asarray(np.uint32(bits) << np.uint32(16), np.uint32).view(np.float32)[()]


def float32_to_bfloat16_bits(value):
    """``value`` rounded to bfloat16, ties to even, as bits (NaN: torch's 0x7FC0)."""
    value = np.float32(value)
    if value != value:
        return BFLOAT16_BITS(0x7FC0)
    bits = int(np.asarray(value).view(np.uint32))
    return BFLOAT16_BITS((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


# --- compiled code --------------------------------------------------------------------


@intrinsic
def _float32_from_bits(typingctx, bits):
    signature = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    signature = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


@register_jitable
def _bfloat16_to_float32(bits):
    return _float32_from_bits(np.uint32(np.uint32(bits) << np.uint32(16)))


@register_jitable
def _float32_to_bfloat16(value):
    if value != value:
        return np.uint16(0x7FC0)
    bits = _bits_of_float32(value)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((bits + rounding) >> np.uint32(16))


@register_jitable
def _float16_to_float32(bits):
    half = np.uint32(np.uint16(bits))
    sign = (half & np.uint32(0x8000)) << np.uint32(16)
    exponent = (half >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = half & np.uint32(0x3FF)
    if exponent == 0x1F:  # inf, NaN
        return _float32_from_bits(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
    if exponent == 0:  # zero, subnormal: mantissa · 2⁻²⁴, exact in float32
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return -magnitude if sign else magnitude
    exponent = exponent + np.uint32(112)  # rebias: 127 − 15
    return _float32_from_bits(sign | (exponent << np.uint32(23)) | (mantissa << np.uint32(13)))


@register_jitable
def _float32_to_float16(value):
    bits = _bits_of_float32(value)
    sign = np.uint32((bits >> np.uint32(16)) & np.uint32(0x8000))
    exponent = np.int32((bits >> np.uint32(23)) & np.uint32(0xFF))
    mantissa = bits & np.uint32(0x7FFFFF)
    if exponent == 0xFF:  # inf, NaN (kept quiet)
        quiet = np.uint32(0x200) if mantissa else np.uint32(0)
        return np.int16(sign | np.uint32(0x7C00) | quiet | (mantissa >> np.uint32(13)))
    exponent = exponent - 112
    if exponent >= 0x1F:
        return np.int16(sign | np.uint32(0x7C00))  # overflow: inf
    if exponent <= 0:  # float16 subnormal or zero
        if exponent < -10:
            return np.int16(sign)
        mantissa = mantissa | np.uint32(0x800000)
        shift = np.uint32(14 - exponent)
        half = mantissa >> shift
        rest = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
        tie = np.uint32(1) << (shift - np.uint32(1))
        if rest > tie or (rest == tie and (half & np.uint32(1))):
            half = half + np.uint32(1)
        return np.int16(sign | half)
    half = (np.uint32(exponent) << np.uint32(10)) | (mantissa >> np.uint32(13))
    rest = mantissa & np.uint32(0x1FFF)
    if rest > 0x1000 or (rest == 0x1000 and (half & np.uint32(1))):
        half = half + np.uint32(1)  # a carry into the exponent rounds up to the next
        # binade, or to inf: both right
    return np.int16(sign | half)


@intrinsic
def _float16_to_float32_by_llvm(typingctx, bits):
    """LLVM's ``fpext half`` (x86 with F16C: one vcvtph2ps per vector): on the CPU the
    branchy integer version above keeps loops from vectorising (float16 Adam 15× slower)."""
    signature = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return signature, codegen


@intrinsic
def _float32_to_float16_by_llvm(typingctx, value):
    """LLVM's ``fptrunc`` to half: round to nearest even, NaN kept, overflow to inf."""
    signature = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return signature, codegen


@intrinsic
def _bfloat16_to_float32_by_llvm(typingctx, bits):
    """`_bfloat16_to_float32` in 32-bit integer lanes (Numba widens integer arithmetic to
    64 bits, which halves the vector width of a loop)."""
    signature = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        word = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return signature, codegen


@intrinsic
def _float32_to_bfloat16_by_llvm(typingctx, value):
    """`_float32_to_bfloat16` in 32-bit integer lanes, the NaN test a select."""
    signature = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        word, half = ir.IntType(32), ir.IntType(16)
        bits = builder.bitcast(args[0], word)
        lowest_kept = builder.and_(builder.lshr(bits, ir.Constant(word, 16)), ir.Constant(word, 1))
        rounded = builder.add(bits, builder.add(lowest_kept, ir.Constant(word, 0x7FFF)))
        high = builder.trunc(builder.lshr(rounded, ir.Constant(word, 16)), half)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(half, 0x7FC0), high)

    return signature, codegen


def _implementations(
    float16_to_float32,
    float32_to_float16,
    bfloat16_to_float32=_bfloat16_to_float32,
    float32_to_bfloat16=_float32_to_bfloat16,
):
    """`load` and `store` overloads, with the given float16 conversions."""

    def load_implementation(pointer, i, like):
        element = pointer.dtype
        if element == types.uint16:
            return lambda pointer, i, like: bfloat16_to_float32(pointer[i])
        if element == types.int16:
            return lambda pointer, i, like: float16_to_float32(pointer[i])
        return lambda pointer, i, like: pointer[i]

    def store_implementation(pointer, i, value):
        element = pointer.dtype
        if element == types.uint16:

            def store_bfloat16(pointer, i, value):
                pointer[i] = float32_to_bfloat16(value)

            return store_bfloat16
        if element == types.int16:

            def store_float16(pointer, i, value):
                pointer[i] = float32_to_float16(value)

            return store_float16

        def store_native(pointer, i, value):
            pointer[i] = value

        return store_native

    return load_implementation, store_implementation


_cpu_load, _cpu_store = _implementations(
    _float16_to_float32_by_llvm,
    _float32_to_float16_by_llvm,
    _bfloat16_to_float32_by_llvm,
    _float32_to_bfloat16_by_llvm,
)
overload(load)(_cpu_load)
overload(store)(_cpu_store)


def register_cuda():
    """Make `load` and `store` compile for the CUDA target too (needs numba-cuda); float16
    by integer arithmetic there (checked to compile to PTX; not yet run on a GPU)."""
    from numba.cuda.extending import overload as cuda_overload

    cuda_load, cuda_store = _implementations(_float16_to_float32, _float32_to_float16)
    cuda_overload(load, target="cuda")(cuda_load)
    cuda_overload(store, target="cuda")(cuda_store)
