"""What the 16-bit precision tests share: the two 16-bit formats, a comparison that is
bit for bit or within an ulp, and the mark of tests that need torch's vector kernels."""

import pytest
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


#: Without AVX2 or AVX-512 (``ATEN_CPU_CAPABILITY=default``) torch's fused Adam rounds
#: every product first, as our float32 rule does, not as `rules.adam.fused_update`.
needs_vector_kernels = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="torch's fused CPU Adam fuses its multiply-adds only in its AVX2 and AVX-512 "
    f"kernels; this torch runs {torch.backends.cpu.get_cpu_capability()}",
)
