"""Values stored in 16 bits and computed in float32: bfloat16 and float16 elements.

NumPy has no bfloat16, so 16-bit floats travel through the kernels as 16-bit integers
holding their bits: ``np.uint16`` for bfloat16 and ``np.int16`` for float16 (the two
integer types only tell the formats apart). `load` reads element ``i`` of a pointer (or
array) as the compute type and `store` writes a computed value back, rounded to the
nearest representable value, ties to even, NaN kept NaN, as torch rounds
(``c10::BFloat16``, ``c10::Half``). For float32 and float64 elements both are plain
indexing, and compile to exactly that.

In compiled code (`kernels.cpu`, `kernels.cuda`) bfloat16 converts by integer arithmetic
on the bits, float16 by the hardware's conversions (x86's F16C, a GPU's ``cvt``), with
no branch in either, so loops over them vectorise on the CPU and unroll on a GPU; in
Python (Numba's CUDA simulator, references in tests) NumPy does them. `widen_bfloat16`,
`widen_float16` and `widen_float16_keeping_nan` build the IR of the conversions to
float32, which `kernels.vectors` applies to each element of a vector load, and
`narrow_bfloat16`, `narrow_float16` and `narrow_float16_keeping_nan` that of the
conversions back, applied to each element of a vector store.

`store_stochastically` writes a computed value rounded *stochastically* to its 16-bit
format: up (away from zero) with probability equal to the fraction of the gap between
the two neighbouring representable values that the value has covered, down otherwise,
so that the stored value is unbiased (``E[stored] = value``). The random bits come from
`random_bits`, a pure integer hash of an entry's key and the element's index: the CPU
loops, the CUDA kernels and the simulator draw the same bits.

`as_bfloat16` and `as_float16` give a computed value as a 16-bit array keeps it
(rounded as `store` rounds, read back): for a rule that computes with its new state as
it will be stored (LAMB's direction, whose norm must be that of the update applied);
`as_stored` does the same for any array's format (a CUDA kernel's vector store of
Kahan's compensation ``y − round(y)``, `kernels.elements`).

`stored_in_16_bits` tells a rule's element step, at compile time, that an array holds
one of these formats, `fused_multiply_add` is ``a·b + c`` rounded once and
`true_divide` a division that a loop's ``arcp`` flag cannot turn into a reciprocal:
together they let a rule compute 16-bit parameters as torch's fused CPU step does
(`specs.KernelSpec.fused_rule`).
"""

from fractions import Fraction

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
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


def stored_in_16_bits(pointer):
    """Whether ``pointer`` (or array) holds bfloat16 or float16 bits: a constant in
    compiled code, so a branch on it costs nothing there."""
    return np.asarray(pointer).dtype in (BFLOAT16_BITS, FLOAT16_BITS)


def element_size(pointer):
    """Bytes of one element of ``pointer`` (or array): a constant in compiled code."""
    return np.asarray(pointer).dtype.itemsize


def fused_multiply_add(a, b, c):
    """``a·b + c`` rounded once (IEEE fma), in the type ``a``, ``b`` and ``c`` promote to.

    Compiled: ``llvm.fma`` on the CPU (one vfmadd per vector where the CPU has FMA),
    ``cuda.fma`` on a GPU. In Python (the CUDA simulator) exactly, in rational
    arithmetic: float64 arithmetic would round twice (once to float64, once to float32).
    """
    kind = np.result_type(a, b, c).type
    a, b, c = kind(a), kind(b), kind(c)
    if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c)):
        with np.errstate(all="ignore"):
            return kind(a * b + c)  # inf and NaN: as fma gives them
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:  # the sign of a zero sum: as a·b + c in IEEE arithmetic
        with np.errstate(all="ignore"):
            return kind(a * b + c)
    with np.errstate(over="ignore"):
        nearest = kind(float(exact))  # float(Fraction) rounds once; to float32, twice
    if not np.isfinite(nearest):
        return nearest
    best = None
    below, above = np.nextafter(nearest, kind(-np.inf)), np.nextafter(nearest, kind(np.inf))
    for candidate in (below, nearest, above):
        if not np.isfinite(candidate):
            continue
        distance = abs(Fraction(float(candidate)) - exact)
        even = int(np.asarray(candidate).view(f"u{np.dtype(kind).itemsize}")) % 2 == 0
        if best is None or distance < best[0] or (distance == best[0] and even):
            best = (distance, candidate)
    return best[1]


def true_divide(a, b):
    """``a / b`` rounded once. Compiled for the CPU it is an ``fdiv`` that the loop's
    fast-math flags do not reach (Numba adds them only to instructions that have none),
    so ``arcp`` cannot make it a multiply by a hoisted reciprocal (≤ 1 ulp apart)."""
    return a / b


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


def as_bfloat16(value):
    """``value`` rounded to bfloat16 as `store` rounds it, read back as float32: what a
    bfloat16 array keeps of it (a rule that must compute with its state as stored)."""
    return bfloat16_bits_to_float32(float32_to_bfloat16_bits(value))


def as_float16(value):
    """``value`` rounded to float16 as `store` rounds it, read back as float32."""
    with np.errstate(over="ignore"):  # beyond float16's range: inf, as `store`
        return np.float32(np.float16(np.float32(value)))


def as_stored(pointer, value):
    """``value`` as ``pointer``'s array keeps it: rounded to its format as `store` rounds
    it and read back as `load` reads it, in registers (Kahan's ``y − round(y)``)."""
    kind = np.asarray(pointer).dtype
    if kind == BFLOAT16_BITS:
        return as_bfloat16(value)
    if kind == FLOAT16_BITS:
        return as_float16(value)
    return value


#: 2³²/φ, odd: consecutive element indices times it are far apart modulo 2³² (Weyl).
GOLDEN = 0x9E3779B9
_WORD = 0xFFFFFFFF


def random_bits(key, i):
    """32 random bits of element ``i`` under the entry's ``key`` (below 2³²): MurmurHash3's
    32-bit finalizer ``fmix32`` of ``key + i·0x9E3779B9 mod 2³²``::

        x ← x ⊕ (x ≫ 16);  x ← x·0x85EBCA6B;  x ← x ⊕ (x ≫ 13);  x ← x·0xC2B2AE35;  x ⊕ (x ≫ 16)

    (all modulo 2³²). An index repeats its bits 2³² elements on."""
    x = (int(key) + (int(i) & _WORD) * GOLDEN) & _WORD
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _WORD
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _WORD
    return np.uint32(x ^ (x >> 16))


def store_stochastically(pointer, i, value, bits):
    """Write ``value`` to element ``i`` of a 16-bit ``pointer`` rounded stochastically
    with the 32 random ``bits`` (`float32_to_bfloat16_bits_stochastically`,
    `float32_to_float16_bits_stochastically`); other formats: as `store`."""
    pointer[i] = stochastic_bits(pointer, value, bits)


def stochastic_bits(pointer, value, bits):
    """What `store_stochastically` writes of ``value`` into ``pointer``'s array: a 16-bit
    format's bits (as its carrier type), rounded with the random ``bits``; other
    formats: ``value`` (a CUDA kernel's vector store of such values,
    `vectors.vector_store_bits`)."""
    kind = np.asarray(pointer).dtype
    if kind == BFLOAT16_BITS:
        return float32_to_bfloat16_bits_stochastically(value, bits)
    if kind == FLOAT16_BITS:
        return float32_to_float16_bits_stochastically(value, bits)
    return value


def float32_to_bfloat16_bits_stochastically(value, bits):
    """``value`` rounded to bfloat16 stochastically, as bits: the top 16 of the 32 random
    ``bits`` added to the float32 bits, then the low 16 bits dropped (as torchao's
    ``_fp32_to_bf16_sr``): the magnitude rounds up with probability (low 16 bits)/2¹⁶.
    NaN gives torch's 0x7FC0, ±inf stays ±inf; a value beyond bfloat16's largest finite
    one rounds to inf with the probability its fraction says."""
    value = np.float32(value)
    if value != value:
        return BFLOAT16_BITS(0x7FC0)
    word = int(np.asarray(value).view(np.uint32))
    return BFLOAT16_BITS((word + (int(bits) >> 16)) >> 16)


def float32_to_float16_bits_stochastically(value, bits):
    """``value`` rounded to float16 stochastically, as bits, with the 32 random ``bits``
    ``r``. Normal range: the 13 dropped mantissa bits ``rest`` round the magnitude up
    when ``r ≫ 19 < rest`` (probability rest/2¹³). Subnormal range (below 2⁻¹⁴), where
    ``s ≥ 14`` bits of the 24-bit significand are dropped: up when ``r ≫ (32 − s) < rest``
    for ``s ≤ 32`` (exact), when ``r·2^(s−32) < rest`` beyond (probability off by less
    than 2⁻³²); below 2⁻⁴⁹ (``s > 55``) always to zero. NaN stays NaN (quiet), ±inf
    ±inf, and a magnitude that rounds up past 65504 becomes inf."""
    word = int(np.asarray(np.float32(value)).view(np.uint32))
    return np.asarray(_float16_stochastic_word(word, int(bits)), np.uint16).view(FLOAT16_BITS)[()]


def _float16_stochastic_word(word, r):
    """`float32_to_float16_bits_stochastically` on Python integers (float32 bits ``word``)."""
    sign = (word >> 16) & 0x8000
    exponent = (word >> 23) & 0xFF
    mantissa = word & 0x7FFFFF
    if exponent == 0xFF:  # inf, NaN (kept quiet)
        return sign | 0x7C00 | (0x200 if mantissa else 0) | (mantissa >> 13)
    exponent -= 112
    if exponent >= 0x1F:
        return sign | 0x7C00
    if exponent > 0:
        half = (exponent << 10) | (mantissa >> 13)
        return sign | (half + ((r >> 19) < (mantissa & 0x1FFF)))
    shift = 14 - exponent
    if shift > 55:
        return sign
    significand = mantissa | 0x800000
    half = significand >> shift if shift < 24 else 0
    rest = significand & ((1 << shift) - 1)
    up = (r >> (32 - shift)) < rest if shift <= 32 else (r << (shift - 32)) < rest
    return sign | (half + up)


# --- compiled code --------------------------------------------------------------------


@intrinsic
def _bits_of_float32(typingctx, value):
    signature = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


def widen_float16(builder, bits):
    """The IR of `_float16_to_float32_by_llvm` on the i16 ``bits``."""
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())


@intrinsic
def _float16_to_float32_by_llvm(typingctx, bits):
    """LLVM's ``fpext half`` (x86 with F16C: one vcvtph2ps per vector): on the CPU an
    integer conversion with branches keeps loops from vectorising (float16 Adam 15× slower)."""
    signature = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return widen_float16(builder, args[0])

    return signature, codegen


@intrinsic
def _float32_to_float16_by_llvm(typingctx, value):
    """LLVM's ``fptrunc`` to half: round to nearest even, NaN kept, overflow to inf."""
    signature = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        return narrow_float16(builder, args[0])

    return signature, codegen


def narrow_float16(builder, value):
    """The IR of `_float32_to_float16_by_llvm` on the float ``value``."""
    return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))


def _float16_nan_as_float32(builder, half_bits):
    """The float32 bits of a float16 NaN (or inf) ``half_bits`` (an i16): its sign, and its
    payload shifted into float32's mantissa, a signalling NaN left signalling."""
    word = ir.IntType(32)
    bits = builder.zext(half_bits, word)
    sign = builder.shl(builder.and_(bits, ir.Constant(word, 0x8000)), ir.Constant(word, 16))
    payload = builder.shl(builder.and_(bits, ir.Constant(word, 0x3FF)), ir.Constant(word, 13))
    return builder.or_(builder.or_(sign, payload), ir.Constant(word, 0x7F800000))


@intrinsic
def _float16_to_float32_on_gpu(typingctx, bits):
    """`_float16_to_float32_by_llvm` (on a GPU, one ``cvt.f32.f16``: exact, as every
    float16 value is a float32 one) for every value but NaN, which keeps its sign and
    payload bits (`_float16_nan_as_float32`), whatever the hardware makes of them;
    chosen by a select, so a loop of them has no branch and unrolls."""
    signature = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return widen_float16_keeping_nan(builder, args[0])

    return signature, codegen


def widen_float16_keeping_nan(builder, bits):
    """The IR of `_float16_to_float32_on_gpu` on the i16 ``bits``."""
    half = ir.IntType(16)
    magnitude = builder.and_(bits, ir.Constant(half, 0x7FFF))
    is_nan = builder.icmp_unsigned(">", magnitude, ir.Constant(half, 0x7C00))
    nan = builder.bitcast(_float16_nan_as_float32(builder, bits), ir.FloatType())
    return builder.select(is_nan, nan, widen_float16(builder, bits))


@intrinsic
def _float32_to_float16_on_gpu(typingctx, value):
    """`_float32_to_float16_by_llvm` (on a GPU, one ``cvt.rn.f16.f32``: round to nearest
    even, overflow to inf, as torch's ``__float2half``) for every value but NaN, which
    gives its sign, 0x7E00 (quiet) and its payload's top 10 bits, as x86's conversion
    on the CPU does; chosen by a select, so a loop of them has no branch and unrolls."""
    signature = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        return narrow_float16_keeping_nan(builder, args[0])

    return signature, codegen


def narrow_float16_keeping_nan(builder, value):
    """The IR of `_float32_to_float16_on_gpu` on the float ``value``."""
    word, half = ir.IntType(32), ir.IntType(16)
    converted = narrow_float16(builder, value)
    bits = builder.bitcast(value, word)
    sign = builder.and_(builder.lshr(bits, ir.Constant(word, 16)), ir.Constant(word, 0x8000))
    payload = builder.lshr(builder.and_(bits, ir.Constant(word, 0x7FFFFF)), ir.Constant(word, 13))
    nan = builder.or_(builder.or_(sign, payload), ir.Constant(word, 0x7E00))
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.select(is_nan, builder.trunc(nan, half), converted)


@intrinsic
def _bfloat16_to_float32_by_llvm(typingctx, bits):
    """bfloat16 ``bits`` as float32 (exact: bfloat16 is float32's top half), in 32-bit
    integer lanes (Numba widens integer arithmetic to 64 bits, which halves the vector
    width of a loop)."""
    signature = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return widen_bfloat16(builder, args[0])

    return signature, codegen


def widen_bfloat16(builder, bits):
    """The IR of `_bfloat16_to_float32_by_llvm` on the i16 ``bits``."""
    word = builder.zext(bits, ir.IntType(32))
    return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)), ir.FloatType())


@intrinsic
def _float32_to_bfloat16_by_llvm(typingctx, value):
    """``value`` rounded to bfloat16, ties to even, as bits (NaN: torch's 0x7FC0), in
    32-bit integer lanes, the NaN test a select (no branch: loops unroll, on a GPU too)."""
    signature = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return narrow_bfloat16(builder, args[0])

    return signature, codegen


def narrow_bfloat16(builder, value):
    """The IR of `_float32_to_bfloat16_by_llvm` on the float ``value``."""
    word, half = ir.IntType(32), ir.IntType(16)
    bits = builder.bitcast(value, word)
    lowest_kept = builder.and_(builder.lshr(bits, ir.Constant(word, 16)), ir.Constant(word, 1))
    rounded = builder.add(bits, builder.add(lowest_kept, ir.Constant(word, 0x7FFF)))
    high = builder.trunc(builder.lshr(rounded, ir.Constant(word, 16)), half)
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.select(is_nan, ir.Constant(half, 0x7FC0), high)


@intrinsic
def _random_bits_by_llvm(typingctx, key, i):
    """`random_bits` in 32-bit integer lanes (Numba widens integer arithmetic to 64 bits,
    which halves the vector width of a loop and needs 64-bit multiplies)."""
    signature = types.uint32(key, i)

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)

        def constant(value):
            return ir.Constant(word, value)

        def shifted_xor(x, shift):
            return builder.xor(x, builder.lshr(x, constant(shift)))

        key_word = builder.trunc(args[0], word) if args[0].type.width > 32 else args[0]
        index_word = builder.trunc(args[1], word) if args[1].type.width > 32 else args[1]
        x = builder.add(key_word, builder.mul(index_word, constant(GOLDEN)))
        x = builder.mul(shifted_xor(x, 16), constant(0x85EBCA6B))
        x = builder.mul(shifted_xor(x, 13), constant(0xC2B2AE35))
        return shifted_xor(x, 16)

    return signature, codegen


@intrinsic
def _float32_to_bfloat16_stochastically_by_llvm(typingctx, value, bits):
    """`float32_to_bfloat16_bits_stochastically` in 32-bit lanes, the NaN test a select."""
    signature = types.uint16(types.float32, types.uint32)

    def codegen(context, builder, signature, args):
        word, half = ir.IntType(32), ir.IntType(16)
        sixteen = ir.Constant(word, 16)
        raised = builder.add(builder.bitcast(args[0], word), builder.lshr(args[1], sixteen))
        high = builder.trunc(builder.lshr(raised, sixteen), half)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(half, 0x7FC0), high)

    return signature, codegen


@register_jitable
def _float32_to_float16_stochastically(value, bits):
    """`float32_to_float16_bits_stochastically` (see there) on the bits, compiled."""
    word = _bits_of_float32(value)
    r = np.uint64(bits)
    sign = np.uint32((word >> np.uint32(16)) & np.uint32(0x8000))
    exponent = np.int32((word >> np.uint32(23)) & np.uint32(0xFF))
    mantissa = word & np.uint32(0x7FFFFF)
    if exponent == 0xFF:  # inf, NaN (kept quiet)
        quiet = np.uint32(0x200) if mantissa else np.uint32(0)
        return np.int16(sign | np.uint32(0x7C00) | quiet | (mantissa >> np.uint32(13)))
    exponent = exponent - 112
    if exponent >= 0x1F:
        return np.int16(sign | np.uint32(0x7C00))
    if exponent > 0:
        half = (np.uint32(exponent) << np.uint32(10)) | (mantissa >> np.uint32(13))
        if (r >> np.uint64(19)) < np.uint64(mantissa & np.uint32(0x1FFF)):
            half = half + np.uint32(1)
        return np.int16(sign | half)
    shift = 14 - exponent
    if shift > 55:
        return np.int16(sign)
    significand = np.uint64(mantissa | np.uint32(0x800000))
    half = significand >> np.uint64(shift) if shift < 24 else np.uint64(0)
    rest = significand & ((np.uint64(1) << np.uint64(shift)) - np.uint64(1))
    if shift <= 32:
        up = (r >> np.uint64(32 - shift)) < rest
    else:
        up = (r << np.uint64(shift - 32)) < rest
    if up:
        half = half + np.uint64(1)
    return np.int16(np.uint64(sign) | half)


@intrinsic
def _llvm_fma(typingctx, a, b, c):
    """``llvm.fma`` of three values of one float type."""
    signature = a(a, a, a)

    def codegen(context, builder, signature, args):
        value = context.get_value_type(signature.return_type)
        name = "llvm.fma.f32" if value == ir.FloatType() else "llvm.fma.f64"
        function_type = ir.FunctionType(value, [value, value, value])
        function = cgutils.get_or_insert_function(builder.module, function_type, name)
        return builder.call(function, args)

    return signature, codegen


@intrinsic
def _fdiv_without_fast_math(typingctx, a, b):
    """``fdiv`` carrying only ``contract`` (which no division contracts with), so that
    Numba's fast-math pass, which flags only unflagged instructions, leaves it exact."""
    signature = a(a, a)

    def codegen(context, builder, signature, args):
        return builder.fdiv(args[0], args[1], flags=("contract",))

    return signature, codegen


def _true_divide_implementation(a, b):
    if a == b == types.float32:
        return lambda a, b: _fdiv_without_fast_math(a, b)
    return lambda a, b: _fdiv_without_fast_math(np.float64(a), np.float64(b))


def _fused_multiply_add_implementation(fma):
    """The `fused_multiply_add` overload over ``fma`` (one float type): float32 when all
    three are float32, float64 otherwise, as ``a·b + c`` would promote."""

    def implementation(a, b, c):
        if a == b == c == types.float32:
            return lambda a, b, c: fma(a, b, c)
        return lambda a, b, c: fma(np.float64(a), np.float64(b), np.float64(c))

    return implementation


def _element_size_implementation(pointer):
    size = pointer.dtype.bitwidth // 8
    return lambda pointer: size


def _stored_in_16_bits_implementation(pointer):
    if pointer.dtype in (types.uint16, types.int16):
        return lambda pointer: True
    return lambda pointer: False


def _implementations(
    float16_to_float32,
    float32_to_float16,
    bfloat16_to_float32=_bfloat16_to_float32_by_llvm,
    float32_to_bfloat16=_float32_to_bfloat16_by_llvm,
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


def _store_stochastically_implementation(pointer, i, value, bits):
    element = pointer.dtype
    if element == types.uint16:

        def store_bfloat16(pointer, i, value, bits):
            pointer[i] = _float32_to_bfloat16_stochastically_by_llvm(value, bits)

        return store_bfloat16
    if element == types.int16:

        def store_float16(pointer, i, value, bits):
            pointer[i] = _float32_to_float16_stochastically(value, bits)

        return store_float16

    def store_native(pointer, i, value, bits):
        pointer[i] = value

    return store_native


def _as_stored_implementation(as_bfloat16, as_float16):
    """The `as_stored` overload over the given compiled `as_bfloat16` and `as_float16`."""

    def implementation(pointer, value):
        if pointer.dtype == types.uint16:
            return lambda pointer, value: as_bfloat16(value)
        if pointer.dtype == types.int16:
            return lambda pointer, value: as_float16(value)
        return lambda pointer, value: value

    return implementation


def _stochastic_bits_implementation(pointer, value, bits):
    if pointer.dtype == types.uint16:
        return lambda pointer, value, bits: _float32_to_bfloat16_stochastically_by_llvm(value, bits)
    if pointer.dtype == types.int16:
        return lambda pointer, value, bits: _float32_to_float16_stochastically(value, bits)
    return lambda pointer, value, bits: value


def _random_bits_implementation(key, i):
    return lambda key, i: _random_bits_by_llvm(key, i)


_cpu_load, _cpu_store = _implementations(_float16_to_float32_by_llvm, _float32_to_float16_by_llvm)
overload(load)(_cpu_load)
overload(store)(_cpu_store)
overload(fused_multiply_add)(_fused_multiply_add_implementation(_llvm_fma))
overload(stored_in_16_bits)(_stored_in_16_bits_implementation)
overload(element_size)(_element_size_implementation)
overload(true_divide)(_true_divide_implementation)
overload(store_stochastically)(_store_stochastically_implementation)
overload(stochastic_bits)(_stochastic_bits_implementation)
overload(random_bits)(_random_bits_implementation)
overload(as_bfloat16)(
    lambda value: lambda value: _bfloat16_to_float32_by_llvm(_float32_to_bfloat16_by_llvm(value))
)
overload(as_float16)(
    lambda value: lambda value: _float16_to_float32_by_llvm(_float32_to_float16_by_llvm(value))
)
overload(as_stored)(_as_stored_implementation(as_bfloat16, as_float16))


def register_cuda():
    """Make `load`, `store`, `element_size`, `fused_multiply_add`, `stored_in_16_bits`,
    `true_divide`, `store_stochastically`, `stochastic_bits`, `random_bits`,
    `as_bfloat16`, `as_float16` and `as_stored` compile for the CUDA target too (needs
    numba-cuda): float16 by ``cvt`` there, a NaN keeping its bits as on the CPU
    (`_float16_to_float32_on_gpu`, `_float32_to_float16_on_gpu`; compiled to PTX by
    bench.gpu_static, run on an H200 by bench.gpu_check), and `fused_multiply_add` by
    ``cuda.fma``."""
    from numba import cuda
    from numba.cuda.extending import overload as cuda_overload

    cuda_load, cuda_store = _implementations(_float16_to_float32_on_gpu, _float32_to_float16_on_gpu)
    cuda_overload(load, target="cuda")(cuda_load)
    cuda_overload(store, target="cuda")(cuda_store)

    fma_implementation = _fused_multiply_add_implementation(cuda.fma)
    cuda_overload(fused_multiply_add, target="cuda")(fma_implementation)
    cuda_overload(stored_in_16_bits, target="cuda")(_stored_in_16_bits_implementation)
    cuda_overload(element_size, target="cuda")(_element_size_implementation)
    cuda_overload(true_divide, target="cuda")(lambda a, b: lambda a, b: a / b)
    cuda_overload(store_stochastically, target="cuda")(_store_stochastically_implementation)
    cuda_overload(stochastic_bits, target="cuda")(_stochastic_bits_implementation)
    cuda_overload(random_bits, target="cuda")(_random_bits_implementation)
    cuda_overload(as_bfloat16, target="cuda")(
        lambda value: (
            lambda value: _bfloat16_to_float32_by_llvm(_float32_to_bfloat16_by_llvm(value))
        )
    )
    cuda_overload(as_float16, target="cuda")(
        lambda value: lambda value: _float16_to_float32_on_gpu(_float32_to_float16_on_gpu(value))
    )
    cuda_overload(as_stored, target="cuda")(_as_stored_implementation(as_bfloat16, as_float16))
