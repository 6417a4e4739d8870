"""What the 16-bit precision tests share: the two 16-bit formats, and a comparison that
is bit for bit or within an ulp."""

import torch

from fastmomentum.kernels.precision import BFLOAT16_BITS, FLOAT16_BITS

FORMATS = [(torch.bfloat16, BFLOAT16_BITS), (torch.float16, FLOAT16_BITS)]

IDS = ["bfloat16", "float16"]


def assert_close(actual, expected, bit_identical, name):
    """Equal bit for bit, or else within one unit in the last place of the tensor's
    largest value (a value that cancels to 0 on one side and 1e-9 on the other counts
    as close)."""
    if bit_identical:
        assert torch.equal(actual, expected), name
        return
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    error = (actual - expected).abs().max()
    assert error <= torch.finfo(torch.bfloat16).eps * scale, (name, float(error), float(scale))
