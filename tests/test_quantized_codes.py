"""Block-wise 8-bit state: the code maps, on values of every magnitude (round trip,
error, ordering, zeros, NaN), Python and compiled alike."""

import numpy as np
import pytest

from fastmomentum.kernels import quantization

from .int8_references import BLOCK, awkward

# --- the code map ----------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_decode_and_encode_back_to_themselves(signed):
    values = awkward(10 * BLOCK + 17, seed=0)
    values = values if signed else values * values
    codes, absmax = quantization.quantize(values, signed)
    blocks = np.abs(values).reshape(-1)
    expected_absmax = [blocks[i : i + BLOCK].max() for i in range(0, values.size, BLOCK)]
    np.testing.assert_array_equal(absmax, expected_absmax)  # the block's largest, exactly
    decoded = quantization.dequantize(codes, absmax)
    again, again_absmax = quantization.quantize(decoded, signed)
    np.testing.assert_array_equal(again, codes)
    if signed:  # the top code decodes to 127 · (a · (1/127)): a, or an ulp from it
        np.testing.assert_allclose(again_absmax, absmax, rtol=2**-22)
    else:
        np.testing.assert_array_equal(again_absmax, absmax)


def test_a_signed_code_is_within_half_a_step_of_its_value():
    """Signed state: a linear map, steps of a/127 (a: the block's absmax)."""
    values = awkward(40 * BLOCK, seed=1)
    codes, absmax = quantization.quantize(values, True)
    decoded = quantization.dequantize(codes, absmax)
    scale = np.repeat(absmax, BLOCK)[: values.size]
    error = np.abs(decoded - values)
    assert (error <= scale / 254 * (1 + 1e-5)).all()
    below = np.abs(values) < scale / 254 * (1 - 1e-5)
    assert below.any() and (decoded[below] == 0).all()  # a step of nothing
    assert (decoded[values == 0] == 0).all()
    assert (np.sign(decoded[~below]) == np.sign(values[~below])).all()


def test_an_unsigned_code_is_within_a_sixteenth_of_its_value_over_32_binades():
    values = awkward(40 * BLOCK, seed=1) ** 2
    codes, absmax = quantization.quantize(values, False)
    decoded = quantization.dequantize(codes, absmax)
    scale = np.repeat(absmax, BLOCK)[: values.size]
    magnitude = np.abs(values)
    in_range = magnitude >= scale * 2.0**-32 * 1.25
    assert in_range.mean() > 0.5
    error = np.abs(decoded - values)[in_range] / magnitude[in_range]
    assert error.max() <= 1 / 16 * (1 + 1e-6)
    below = (magnitude < scale * 2.0**-32) & (magnitude > 0)
    assert below.any()
    # never zero: a nonzero second moment would make a step of m / eps
    assert (decoded[magnitude > 0] > 0).all()
    assert (decoded[below] >= magnitude[below]).all()
    assert (decoded[values == 0] == 0).all()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_decode_in_order_and_the_top_code_to_the_absmax(signed):
    top = 127 if signed else 255
    levels = np.arange(-top if signed else 0, top + 1)
    codes = levels.astype(np.int8 if signed else np.uint8)
    padded = np.zeros(quantization.blocks(codes.size) * BLOCK, codes.dtype)
    padded[: codes.size] = codes
    absmax = np.full(quantization.blocks(padded.size), 3.0, np.float32)
    decoded = quantization.dequantize(padded, absmax)[: codes.size]
    assert (np.diff(decoded) > 0).all()
    assert decoded[-1] == pytest.approx(3.0, rel=2**-22) and decoded[levels == 0] == 0


def test_a_nan_makes_its_block_nan_and_leaves_the_others():
    values = awkward(3 * BLOCK, seed=2)
    values[BLOCK + 5] = np.nan
    codes, absmax = quantization.quantize(values, True)
    assert np.isnan(absmax[1]) and not np.isnan(absmax[[0, 2]]).any()
    decoded = quantization.dequantize(codes, absmax)
    assert np.isnan(decoded[BLOCK : 2 * BLOCK]).all()
    assert not np.isnan(decoded[:BLOCK]).any() and not np.isnan(decoded[2 * BLOCK :]).any()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_python_codes_are_the_compiled_codes(signed):
    """The CUDA simulator runs the code map as Python."""
    values = awkward(4 * BLOCK, seed=3)
    values = values if signed else values * values
    codes, absmax = quantization.quantize(values, signed)
    encode = quantization.encode_signed if signed else quantization.encode_unsigned
    decode = quantization.decode_signed if signed else quantization.decode_unsigned
    blocks = np.arange(values.size) // BLOCK
    python = [encode(x, quantization.inverse(absmax[b])) for x, b in zip(values, blocks)]
    np.testing.assert_array_equal(np.array(python, codes.dtype), codes)
    python = [decode(c, absmax[b]) for c, b in zip(codes, blocks)]
    np.testing.assert_array_equal(np.array(python), quantization.dequantize(codes, absmax))
