"""Block-wise 8-bit state through the low-level API (`adam_8bit_step`,
`sgd_8bit_step`): the optimizers' steps bit for bit, refusals, device arrays."""

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum.kernels import quantization

from .int8_references import BLOCK, assert_codes_agree, awkward, empty_state

# --- the low-level API -------------------------------------------------------------------


def _flat_twins(dtype, size=700, seed=0):
    """A 1-D parameter for the torch optimizer and the same values as a NumPy array."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(size, generator=generator).to(dtype).requires_grad_()
    array = param.detach().clone().view(torch.int16 if dtype != torch.float32 else dtype)
    array = array.numpy().copy()
    if dtype == torch.bfloat16:
        import ml_dtypes

        array = array.view(ml_dtypes.bfloat16)
    elif dtype == torch.float16:
        array = array.view(np.float16)
    return param, array


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_low_level_8bit_steps_are_the_optimizers_steps(dtype):
    from fastmomentum.kernels import adam_8bit_step, sgd_8bit_step

    for name in ("AdamW", "SGD"):
        param, array = _flat_twins(dtype)
        if name == "AdamW":
            options = {"lr": 1e-2, "weight_decay": 0.1}
            optimizer = fastmomentum.AdamW([param], state_dtype="int8_blockwise", **options)
            state = empty_state(array.size)  # exp_avg codes, absmax, exp_avg_sq codes, absmax
        else:
            options = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
            optimizer = fastmomentum.SGD([param], state_dtype="int8_blockwise", **options)
            state = empty_state(array.size)[:2]
        generator = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
            grad = param.grad.view(torch.int16) if dtype != torch.float32 else param.grad
            grad = grad.numpy().view(array.dtype)
            optimizer.step()
            if name == "AdamW":
                adam_8bit_step(
                    array, grad, *state, step=step, decoupled_weight_decay=True, **options
                )
            else:
                sgd_8bit_step(array, grad, *state, first_step=step == 1, **options)
            stepped = param.detach().view(torch.int16) if dtype != torch.float32 else param.detach()
            np.testing.assert_array_equal(stepped.numpy().view(array.dtype), array)
            ordered = state if name == "SGD" else [state[k] for k in (0, 2, 1, 3)]
            keys = optimizer.state_names(optimizer.param_groups[0])  # codes, then absmax
            for key, value in zip(keys, ordered):
                np.testing.assert_array_equal(optimizer.state[param][key].numpy(), value)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: {**a, "exp_avg_codes": a["exp_avg_sq_codes"].copy()}, TypeError,
         "exp_avg_codes has dtype uint8; expected int8"),
        (lambda a: {**a, "exp_avg_absmax": a["exp_avg_absmax"][:1].copy()}, ValueError,
         r"exp_avg_absmax has shape \(1,\); expected \(3,\)"),
        (lambda a: {**a, "exp_avg_sq_codes": a["exp_avg_sq_codes"][:-1].copy()}, ValueError,
         "exp_avg_sq_codes has shape"),
        (lambda a: {**a, "param": a["param"].astype(np.float64),
                    "grad": a["grad"].astype(np.float64)}, TypeError, "8-bit state is for"),
        (lambda a: {**a, "grad": a["grad"].astype(np.float16)}, TypeError, "grad has dtype"),
    ],
    ids=["codes-dtype", "absmax-size", "codes-shape", "float64", "grad-dtype"],
)  # fmt: skip
def test_low_level_8bit_arrays_we_cannot_step_are_refused_untouched(change, error, message):
    from fastmomentum.kernels import adam_8bit_step

    size = 2 * BLOCK + 5
    rng = np.random.default_rng(0)
    arrays = {"param": rng.standard_normal(size).astype(np.float32),
              "grad": rng.standard_normal(size).astype(np.float32)}  # fmt: skip
    codes, absmax = quantization.quantize(rng.standard_normal(size).astype(np.float32), True)
    arrays |= {"exp_avg_codes": codes, "exp_avg_absmax": absmax}
    codes, absmax = quantization.quantize(rng.random(size).astype(np.float32), False)
    arrays |= {"exp_avg_sq_codes": codes, "exp_avg_sq_absmax": absmax}
    arrays = change(arrays)
    before = {name: array.copy() for name, array in arrays.items()}
    with pytest.raises(error, match=message):
        adam_8bit_step(**arrays, step=3)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, before[name])


def test_low_level_8bit_sgd_needs_momentum():
    from fastmomentum.kernels import sgd_8bit_step

    param, grad = np.ones(4, np.float32), np.ones(4, np.float32)
    codes, absmax = np.zeros(4, np.int8), np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="needs momentum > 0"):
        sgd_8bit_step(param, grad, codes, absmax, lr=0.1, momentum=0.0)
    assert (param == 1).all()


@pytest.mark.cudasim
def test_the_low_level_8bit_step_runs_on_device_arrays():
    from numba import cuda

    from fastmomentum.kernels import adam_8bit_step

    size = 300
    host = [awkward(size, seed=50), np.ones(size, np.float32), *empty_state(size)]
    device = [cuda.to_device(array) for array in host]
    for step in (1, 2):
        adam_8bit_step(*host, step=step, lr=1e-2)
        adam_8bit_step(*device, step=step, lr=1e-2)
    np.testing.assert_allclose(device[0].copy_to_host(), host[0], rtol=1e-6, atol=1e-7)
    for array, on_device in zip(host[2:], device[2:]):
        got = on_device.copy_to_host()
        if got.dtype == np.float32:
            np.testing.assert_allclose(got, array, rtol=1e-6)
        else:
            assert_codes_agree(got, array)
