"""Block-wise 8-bit optimizer state: one byte per element and a float32 absmax per block.

A state tensor is cut into blocks of `BLOCK` consecutive elements, counted from the
tensor's first element (its last block may be shorter). A block keeps the largest
magnitude ``a`` of its values (float32) and one code per element, in one of two maps:

- signed values (Adam's ``exp_avg``, SGD's ``momentum_buffer``): ``c = round(127·x/a)``
  (int8 in [−127, 127], ties to even), decoded as ``c · (a · (1/127))``: a linear map,
  every value within ``a/254`` of its code, magnitudes below ``a/254`` rounding to zero;
- non-negative values (``exp_avg_sq``): ``x / a``, a number in [0, 1], as a tiny float
  of 3 mantissa bits (rounded to nearest, ties away from zero) whose exponent is the
  code's high bits, ``c ∈ [0, 255]`` (uint8): every code within 1/16 of its value,
  over 32 binades below ``a``, so that ``√x``, what Adam divides by, spans 16; a nonzero
  ``x`` never gets code 0 (which would make a step of ``m / ε``), and magnitudes below
  the range round up to the smallest code (a smaller step, never a larger one).

Decoding then encoding gives the same codes back. A NaN in a block makes its absmax
NaN, and the whole block with it.

Why two maps. The first moment is what a step moves by, the second what it divides by:
an error relative to the block's largest first moment costs a step as much as it costs
that element, while a second moment too small by a factor blows the step up by its
root. The linear map is a multiply, a rounding and a narrowing each way, which a CPU
vector loop does in 3 instructions where the tiny float's sign and zero take 10
(bench/NOTES.md entry 22: on 2 AMD EPYC cores, where the 8-bit step is bound by its
instructions, the tiny float for both made it slower than torch's fused float32 step).
State dicts saved before the linear map hold signed codes in the tiny float, and do
not name their maps (``int8_code_maps`` in their groups): `fastmomentum.quantized`
refuses them.

bitsandbytes' 8-bit optimizers (Dettmers et al., 2022) scale blocks by their absmax
too, with a "dynamic" table of 256 values searched per element; codes that are the
bits of a small float, or a linear map, are arithmetic per element, which vectorises.

The functions here compile inline (``register_jitable``) in the CPU loops and CUDA
kernels, and run as Python in Numba's CUDA simulator; `quantize` and `dequantize`
convert whole arrays with them (checkpoints of another state format, and tests).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload, register_jitable

from . import diskcache

#: Elements per block: one absmax (4 bytes) per 256 codes is 1/64 byte per element.
BLOCK = 256

#: The element types of codes: signed (``exp_avg``) and non-negative (``exp_avg_sq``).
SIGNED_CODE = np.int8
UNSIGNED_CODE = np.uint8

#: Zeros of the codes' and the absmax's element types, on which `pointers.pointer_to`
#: types the pointers of the generated loops and kernels (`elements.segment_source`).
SIGNED_CODE_ZERO, UNSIGNED_CODE_ZERO = SIGNED_CODE(0), UNSIGNED_CODE(0)
ABSMAX_ZERO = np.float32(0)

#: Signed codes: ``x`` is ``c`` steps of ``a / 127``.
_SIGNED_STEPS = np.float32(127)
_SIGNED_STEP = np.float32(1 / 127)
#: Adding 1.5·2²³ to a float32 of magnitude below 2²² rounds it to an integer (ties to
#: even) held in the low bits of the sum's bits: the code is their low byte.
_ROUNDER = np.float32(1.5 * 2**23)
_ROUNDER_BITS = np.int32(0x4B400000)

#: ``x / a`` rounded to 3 mantissa bits is ``(float32 bits + 2¹⁹) >> 20``: 1016 for
#: 1.0, each binade below 8 less. The unsigned code is that minus an offset, so that
#: 1.0 is the top code (255).
_MANTISSA_SHIFT = 20
_UNSIGNED_OFFSET = np.int32(1016 - 255)
_UNSIGNED_TOP = np.int32(255)
_NO_LEVEL = np.int32(0)
_LOWEST_LEVEL = np.int32(1)
_ZERO = np.float32(0)
_ONE = np.float32(1)


def blocks(size):
    """How many blocks ``size`` elements take."""
    return -(-size // BLOCK)


# --- the tiny float: Python (simulator, references) and compiled ----------------------


def rounded_level(fraction, offset):
    """``fraction ≥ 0`` (float32) rounded to 3 mantissa bits, as a level: the top bits
    of its float32 bits less ``offset`` (int32; ≤ 0 below the format's range)."""
    bits = int(np.asarray(np.float32(fraction)).view(np.uint32))
    return np.int32(((bits + (1 << 19)) >> _MANTISSA_SHIFT) - int(offset))


def rounded_integer(value):
    """``value`` (float32, magnitude below 2²²) rounded to an integer, ties to even
    (int32)."""
    total = np.asarray(np.float32(value) + _ROUNDER).view(np.int32)
    return np.int32(int(total) - int(_ROUNDER_BITS))


def level_fraction(level, offset):
    """The fraction ``level ≥ 1`` stands for (float32), inverse of `rounded_level`."""
    bits = np.uint32((int(level) + int(offset)) << _MANTISSA_SHIFT)
    return np.asarray(bits).view(np.float32)[()]


@intrinsic
def _rounded_level(typingctx, fraction, offset):
    signature = types.int32(types.float32, types.int32)

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        bits = builder.bitcast(args[0], word)
        rounded = builder.lshr(
            builder.add(bits, ir.Constant(word, 1 << 19)), ir.Constant(word, _MANTISSA_SHIFT)
        )
        return builder.sub(rounded, args[1])

    return signature, codegen


@intrinsic
def _level_fraction(typingctx, level, offset):
    signature = types.float32(types.int32, types.int32)

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], args[1]), ir.Constant(word, _MANTISSA_SHIFT))
        return builder.bitcast(bits, ir.FloatType())

    return signature, codegen


@intrinsic
def _rounded_integer(typingctx, value):
    signature = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        total = builder.fadd(args[0], ir.Constant(ir.FloatType(), float(_ROUNDER)))
        return builder.sub(builder.bitcast(total, word), ir.Constant(word, int(_ROUNDER_BITS)))

    return signature, codegen


def _compiled_rounded_integer(value):
    return lambda value: _rounded_integer(value)


def _compiled_rounded_level(fraction, offset):
    return lambda fraction, offset: _rounded_level(fraction, offset)


def _compiled_level_fraction(level, offset):
    return lambda level, offset: _level_fraction(level, offset)


overload(rounded_integer)(_compiled_rounded_integer)
overload(rounded_level)(_compiled_rounded_level)
overload(level_fraction)(_compiled_level_fraction)


def register_cuda():
    """Make the codes compile for the CUDA target too (needs numba-cuda)."""
    from numba.cuda.extending import overload as cuda_overload

    cuda_overload(rounded_integer, target="cuda")(_compiled_rounded_integer)
    cuda_overload(rounded_level, target="cuda")(_compiled_rounded_level)
    cuda_overload(level_fraction, target="cuda")(_compiled_level_fraction)


# --- codes ----------------------------------------------------------------------------


@register_jitable
def inverse(absmax):
    """``1 / a``, or 0 for an all-zero block (whose codes are all 0)."""
    return _ONE / absmax if absmax != _ZERO else _ZERO


@register_jitable
def encode_signed(value, inverse_absmax):
    """The signed code of ``value`` in a block of absmax ``1 / inverse_absmax``."""
    return SIGNED_CODE(rounded_integer(value * (inverse_absmax * _SIGNED_STEPS)))


@register_jitable
def encode_unsigned(value, inverse_absmax):
    """The non-negative code of ``value ≥ 0`` in a block of absmax ``1 / inverse_absmax``."""
    level = rounded_level(value * inverse_absmax, _UNSIGNED_OFFSET)
    level = min(max(level, _LOWEST_LEVEL if value > _ZERO else _NO_LEVEL), _UNSIGNED_TOP)
    return UNSIGNED_CODE(level)


@register_jitable
def decode_signed(code, absmax):
    """The value of signed ``code`` in a block of absmax ``absmax``."""
    return np.float32(np.int32(code)) * (absmax * _SIGNED_STEP)


@register_jitable
def decode_unsigned(code, absmax):
    """The value of non-negative ``code`` in a block of absmax ``absmax``."""
    level = np.int32(code)
    magnitude = level_fraction(level, _UNSIGNED_OFFSET) * absmax
    return _ZERO if level == _NO_LEVEL else magnitude


# --- the block maximum in compiled CPU loops ------------------------------------------


@intrinsic
def magnitude_bits(typingctx, value):
    """The bits of ``|value|`` (float32) as an int32: for magnitudes, integer order is
    float order, and NaN above infinity. A running integer maximum vectorises where a
    float one (which must keep NaN) does not."""
    signature = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(bits, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return signature, codegen


@intrinsic
def float_of_bits(typingctx, bits):
    """The float32 whose bits are the int32 ``bits``."""
    signature = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


# --- whole arrays ---------------------------------------------------------------------


@njit(parallel=True, cache=diskcache.available(__file__), error_model="numpy")
def _quantize(values, codes, absmax, signed):
    for block in prange(absmax.size):
        start = block * BLOCK
        stop = min(start + BLOCK, values.size)
        top = np.int32(0)
        for i in range(start, stop):
            top = max(top, magnitude_bits(values[i]))
        largest = float_of_bits(top)
        absmax[block] = largest
        scaled = inverse(largest)
        if signed:
            for i in range(start, stop):
                codes[i] = encode_signed(values[i], scaled)
        else:
            for i in range(start, stop):
                codes[i] = encode_unsigned(values[i], scaled)


@njit(parallel=True, cache=diskcache.available(__file__), error_model="numpy")
def _dequantize(codes, absmax, values, signed):
    for block in prange(absmax.size):
        start = block * BLOCK
        stop = min(start + BLOCK, values.size)
        if signed:
            for i in range(start, stop):
                values[i] = decode_signed(codes[i], absmax[block])
        else:
            for i in range(start, stop):
                values[i] = decode_unsigned(codes[i], absmax[block])


def quantize(values, signed):
    """``(codes, absmax)`` of the 1-D float32 array ``values``, block by block, exactly
    as a step stores them: int8 codes when ``signed``, else uint8 (``values ≥ 0``)."""
    values = np.ascontiguousarray(values, np.float32).reshape(-1)
    codes = np.empty(values.size, SIGNED_CODE if signed else UNSIGNED_CODE)
    absmax = np.empty(blocks(values.size), np.float32)
    _quantize(values, codes, absmax, bool(signed))
    return codes, absmax


def dequantize(codes, absmax):
    """The float32 values of 1-D ``codes`` (int8: signed, uint8: non-negative) with
    their blocks' ``absmax``, as a step reads them."""
    codes = np.ascontiguousarray(codes).reshape(-1)
    if codes.dtype not in (np.dtype(SIGNED_CODE), np.dtype(UNSIGNED_CODE)):
        raise TypeError(f"codes must be int8 or uint8, got {codes.dtype}")
    absmax = np.ascontiguousarray(absmax, np.float32).reshape(-1)
    if absmax.size != blocks(codes.size):
        raise ValueError(
            f"{codes.size} codes take {blocks(codes.size)} blocks of {BLOCK}; "
            f"absmax has {absmax.size} values"
        )
    values = np.empty(codes.size, np.float32)
    _dequantize(codes, absmax, values, codes.dtype == np.dtype(SIGNED_CODE))
    return values
