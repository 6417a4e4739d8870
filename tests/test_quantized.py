"""Block-wise 8-bit Adam state (``state_dtype="int8_blockwise"``).

The code map is checked on values of every magnitude (round trip, relative error,
ordering, zeros, NaN); the CPU loop against a NumPy float32 reference, step by step from
its own state (the loop divides by a reciprocal, ≤ 1 ulp, which may move a value that
lies on a rounding boundary by one code); the CUDA kernel against the CPU loop; the
optimizers against the same reference, through checkpoints in every direction.
"""

import io

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum import quantized
from fastmomentum.kernels import config, cpu, quantization, rules
from fastmomentum.kernels.api import cuda_kernels
from fastmomentum.kernels.tables import TensorTable

BLOCK = quantization.BLOCK


def _awkward(size, seed):
    """Values of many magnitudes and both signs, with zeros, in blocks of various spreads."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size) * np.exp(3 * rng.standard_normal(size))
    values[rng.random(size) < 0.05] = 0
    return values.astype(np.float32)


# --- the code map ----------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_decode_and_encode_back_to_themselves(signed):
    values = _awkward(10 * BLOCK + 17, seed=0)
    values = values if signed else values * values
    codes, absmax = quantization.quantize(values, signed)
    blocks = np.abs(values).reshape(-1)
    expected_absmax = [blocks[i : i + BLOCK].max() for i in range(0, values.size, BLOCK)]
    np.testing.assert_array_equal(absmax, expected_absmax)  # the block's largest, exactly
    decoded = quantization.dequantize(codes, absmax)
    again, again_absmax = quantization.quantize(decoded, signed)
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(again_absmax, absmax)


@pytest.mark.parametrize(
    ("signed", "binades"), [(True, 16), (False, 32)], ids=["signed", "unsigned"]
)
def test_a_code_is_within_a_sixteenth_of_its_value_over_the_range(signed, binades):
    values = _awkward(40 * BLOCK, seed=1)
    values = values if signed else values * values
    codes, absmax = quantization.quantize(values, signed)
    decoded = quantization.dequantize(codes, absmax)
    scale = np.repeat(absmax, BLOCK)[: values.size]
    magnitude = np.abs(values)
    in_range = magnitude >= scale * 2.0**-binades * 1.25
    assert in_range.mean() > 0.5
    error = np.abs(decoded - values)[in_range] / magnitude[in_range]
    assert error.max() <= 1 / 16 * (1 + 1e-6)
    below = (magnitude < scale * 2.0**-binades) & (magnitude > 0)
    assert below.any()
    if signed:  # below the range: zero, a step of nothing
        assert (decoded[below] == 0).all()
    else:  # never zero: a nonzero second moment would make a step of m / eps
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
    assert decoded[-1] == 3.0 and decoded[levels == 0] == 0


def test_a_nan_makes_its_block_nan_and_leaves_the_others():
    values = _awkward(3 * BLOCK, seed=2)
    values[BLOCK + 5] = np.nan
    codes, absmax = quantization.quantize(values, True)
    assert np.isnan(absmax[1]) and not np.isnan(absmax[[0, 2]]).any()
    decoded = quantization.dequantize(codes, absmax)
    assert np.isnan(decoded[BLOCK : 2 * BLOCK]).all()
    assert not np.isnan(decoded[:BLOCK]).any() and not np.isnan(decoded[2 * BLOCK :]).any()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_python_codes_are_the_compiled_codes(signed):
    """The CUDA simulator runs the code map as Python."""
    values = _awkward(4 * BLOCK, seed=3)
    values = values if signed else values * values
    codes, absmax = quantization.quantize(values, signed)
    encode = quantization.encode_signed if signed else quantization.encode_unsigned
    decode = quantization.decode_signed if signed else quantization.decode_unsigned
    blocks = np.arange(values.size) // BLOCK
    python = [encode(x, quantization.inverse(absmax[b])) for x, b in zip(values, blocks)]
    np.testing.assert_array_equal(np.array(python, codes.dtype), codes)
    python = [decode(c, absmax[b]) for c, b in zip(codes, blocks)]
    np.testing.assert_array_equal(np.array(python), quantization.dequantize(codes, absmax))


# --- the kernels -----------------------------------------------------------------------


def _reference_step(param, grad, codes, step, lr, betas, eps, weight_decay, decoupled, maximize):
    """One 8-bit Adam step in NumPy float32, in `rules.adam`'s order, from decoded
    moments; returns the new param and the new (codes, absmax) of both moments."""
    dtype = np.dtype(np.float32)
    beta1, beta1_c, beta2, beta2_c, eps, factor, l2, decay = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled, maximize
    )
    step_size, correction2 = rules.adam.step_coefficients(dtype, step, lr, betas)
    m = quantization.dequantize(codes[0], codes[1])
    v = quantization.dequantize(codes[2], codes[3])
    param = param * decay
    grad = factor * grad
    if l2 != 0:
        grad = grad + l2 * param
    m = m + beta1_c * (grad - m) if beta1_c < beta1 else grad - (grad - m) * beta1
    v = v * beta2 + beta2_c * grad * grad
    param = param + step_size * m / (np.sqrt(v) / correction2 + eps)
    return param, (*quantization.quantize(m, True), *quantization.quantize(v, False))


def _assert_codes_agree(actual, expected):
    """Codes equal but for values on a rounding boundary: at most one level apart, rarely."""
    differ = actual != expected
    assert differ.sum() <= 2e-3 * differ.size
    assert (np.abs(actual.astype(np.int32) - expected.astype(np.int32))[differ] <= 1).all()


def _empty_state(size):
    blocks = quantization.blocks(size)
    return [np.zeros(size, np.int8), np.zeros(blocks, np.float32)] + [
        np.zeros(size, np.uint8),
        np.zeros(blocks, np.float32),
    ]


def _launch(kernels, params, grads, states, step, options):
    """One table over every (param, state) entry: codes, codes, absmax, absmax columns."""
    table = TensorTable([p.size for p in params], 6, np.float32, 2)
    for row, (param, grad, state) in enumerate(zip(params, grads, states)):
        table.addresses[row] = [param.ctypes.data, grad.ctypes.data] + [
            state[k].ctypes.data for k in (0, 2, 1, 3)
        ]
    dtype = np.dtype(np.float32)
    lr, betas = options["lr"], options["betas"]
    table.entry_values[:] = rules.adam.step_coefficients(dtype, step, lr, betas)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, options["eps"], options["weight_decay"], options["decoupled"],
        options["maximize"],
    )  # fmt: skip
    kernels.adam_blockwise(table, coefficients)


OPTIONS = [
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "decoupled": True,
     "maximize": False},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01, "decoupled": False,
     "maximize": True},
]  # fmt: skip


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("options", OPTIONS, ids=["adamw", "adam-l2-maximize"])
def test_the_cpu_loop_steps_as_the_float32_reference(options, threading, monkeypatch):
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    sizes = [1000, BLOCK, 3, 0, 5 * BLOCK + 1]
    params = [_awkward(n, seed=10 + n) for n in sizes]
    states = [_empty_state(n) for n in sizes]
    rng = np.random.default_rng(4)
    for step in range(1, 6):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        expected = [
            _reference_step(p.copy(), g, s, step, **options)
            for p, g, s in zip(params, grads, states)
        ]
        _launch(cpu, params, grads, states, step, options)
        for param, state, (wanted, wanted_state) in zip(params, states, expected):
            np.testing.assert_allclose(param, wanted, rtol=1e-6, atol=1e-7)
            for got, want in zip(state, wanted_state):
                if got.dtype == np.float32:  # absmax: of the same float32 moments
                    np.testing.assert_allclose(got, want, rtol=1e-6)
                else:
                    _assert_codes_agree(got, want)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_cpu_parts_start_at_block_boundaries_and_cover_every_element_once(parts):
    lengths = np.array([5, 0, 3 * BLOCK, BLOCK + 1, 1, 10 * BLOCK - 3])
    segments, part_starts = TensorTable(lengths, 6, np.float32).cpu_schedule(parts, BLOCK)
    assert part_starts.size == parts + 1
    assert (segments[:, 1] % BLOCK == 0).all()
    covered = [np.zeros(n, int) for n in lengths]
    for entry, begin, end in segments:
        covered[entry][begin:end] += 1
    assert all((c == 1).all() for c in covered)


@pytest.mark.cudasim
def test_the_cuda_kernel_steps_as_the_cpu_loop():
    kernels = cuda_kernels()
    sizes = [300, 5, BLOCK]
    start = [_awkward(n, seed=20 + n) for n in sizes]
    runs = {}
    for name, target in (("cpu", cpu), ("cuda", kernels)):
        params, states = [p.copy() for p in start], [_empty_state(n) for n in sizes]
        rng = np.random.default_rng(5)
        for step in (1, 2):
            grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            _launch(target, params, grads, states, step, OPTIONS[0])
        runs[name] = params, states
    for param_cpu, param_cuda in zip(runs["cpu"][0], runs["cuda"][0]):
        np.testing.assert_allclose(param_cuda, param_cpu, rtol=1e-6, atol=1e-7)
    for state_cpu, state_cuda in zip(runs["cpu"][1], runs["cuda"][1]):
        for got, want in zip(state_cuda, state_cpu):
            if got.dtype == np.float32:
                np.testing.assert_allclose(got, want, rtol=1e-6)
            else:
                _assert_codes_agree(got, want)


# --- the optimizers --------------------------------------------------------------------

SHAPES = [(64, 33), (33,), (1,), (2, 3, 4, 5)]


def _params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    params[-1] = params[-1].to(memory_format=torch.channels_last)
    return [p.requires_grad_() for p in params]


def _set_grads(params, generator):
    for param in params:
        grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        param.grad = (
            grad.contiguous(memory_format=torch.channels_last) if param.dim() == 4 else grad
        )


def _codes_of(optimizer, param):
    state = optimizer.state[param]
    return [
        quantized._memory_order(state[key]).numpy().copy() if state[key].dim() else None
        for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
    ]


@pytest.mark.parametrize(
    ("name", "options"),
    [("AdamW", OPTIONS[0]), ("Adam", OPTIONS[1])],
    ids=["adamw", "adam-l2-maximize"],
)
def test_8bit_adam_steps_every_parameter_as_the_reference(name, options):
    params = _params()
    kwargs = {key: options[key] for key in ("lr", "betas", "eps", "weight_decay", "maximize")}
    optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        before = [_codes_of(optimizer, p) if step > 1 else _empty_state(p.numel()) for p in params]
        values = [quantized._memory_order(p.detach()).numpy().copy() for p in params]
        _set_grads(params, generator)
        grads = [quantized._memory_order(p.grad).numpy() for p in params]
        optimizer.step()
        for param, value, grad, state in zip(params, values, grads, before):
            wanted, wanted_state = _reference_step(value, grad, state, step, **options)
            got = quantized._memory_order(param.detach()).numpy()
            np.testing.assert_allclose(got, wanted, rtol=1e-6, atol=1e-7)
            for got_state, want in zip(_codes_of(optimizer, param), wanted_state):
                if got_state.dtype == np.float32:
                    np.testing.assert_allclose(got_state, want, rtol=1e-6)
                else:
                    _assert_codes_agree(got_state, want)
            assert float(optimizer.state[param]["step"]) == step


def test_8bit_state_pieces_keep_the_parameters_layout_and_a_storage_each():
    params = _params()
    optimizer = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _set_grads(params, torch.Generator().manual_seed(1))
    optimizer.step()
    storages = set()
    for param in params:
        state = optimizer.state[param]
        assert state["exp_avg_codes"].dtype == torch.int8
        assert state["exp_avg_sq_codes"].dtype == torch.uint8
        assert state["exp_avg_codes"].stride() == param.stride()
        assert state["exp_avg_absmax"].shape == (quantization.blocks(param.numel()),)
        for value in state.values():
            storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == 5 * len(params)  # step, two codes, two absmax: each its own


def _run(optimizer, params, seed, steps):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _set_grads(params, generator)
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_8bit_run_resumes_bit_identically_from_its_checkpoint(dtype):
    params = _params(dtype)
    optimizer = fastmomentum.AdamW(params, lr=1e-2, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = fastmomentum.AdamW(resumed_params, lr=1e-2, state_dtype="int8_blockwise")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for param, twin in zip(params, resumed_params):  # absmax stays float32 for bf16 params
        for key, value in optimizer.state[param].items():
            assert torch.equal(resumed.state[twin][key], value), key
    _run(optimizer, params, seed=2, steps=3)
    _run(resumed, resumed_params, seed=2, steps=3)
    for param, twin in zip(params, resumed_params):
        assert torch.equal(param, twin)
        for key, value in optimizer.state[param].items():
            assert torch.equal(resumed.state[twin][key], value), key


def test_8bit_checkpoints_convert_both_ways_and_torch_loads_them_decoded():
    params = _params()
    full = torch.optim.Adam(params, lr=1e-2)
    _run(full, params, seed=1, steps=3)
    # a float32 checkpoint into 8-bit state: quantized block by block, as a step would
    low = fastmomentum.Adam(params, lr=1e-2, state_dtype="int8_blockwise")
    low.load_state_dict(full.state_dict())
    for param in params:
        for moment in ("exp_avg", "exp_avg_sq"):
            codes, absmax, signed = quantized.MOMENTS[moment]
            wanted = quantized.quantize_moment(full.state[param][moment], param.stride(), signed)
            assert torch.equal(low.state[param][codes], wanted[0])
            assert torch.equal(low.state[param][absmax], wanted[1])
        assert torch.equal(low.state[param]["step"], full.state[param]["step"])
    # ours back into a float32 optimizer (ours, or torch's through dequantized_state_dict)
    saved = low.state_dict()
    decoded = fastmomentum.dequantized_state_dict(saved)
    assert set(saved["state"][0]) == {"step", *quantized.STATE_KEYS}  # unchanged
    for target in (fastmomentum.Adam(params, lr=1e-2), torch.optim.Adam(params, lr=1e-2)):
        target.load_state_dict(decoded if isinstance(target, torch.optim.Adam) else saved)
        for param in params:
            state = low.state[param]
            for moment in ("exp_avg", "exp_avg_sq"):
                codes, absmax, _ = quantized.MOMENTS[moment]
                wanted = quantized.dequantize_moment(state[codes], state[absmax])
                assert torch.equal(target.state[param][moment], wanted)
                assert target.state[param][moment].stride() == param.stride()
        _run(target, params, seed=3, steps=1)  # and steps on


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: fastmomentum.Adam(p, amsgrad=True, state_dtype="int8_blockwise"), "amsgrad"),
        (lambda p: fastmomentum.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                                     state_dtype="int8_blockwise"),
         "is for float32, bfloat16, float16 parameters"),
        (lambda p: fastmomentum.Adam(p, master_weights=True, state_dtype="int8_blockwise"),
         "master_weights"),
        (lambda p: fastmomentum.Adam(p, state_dtype="int4"), "state_dtype must be None"),
    ],
    ids=["amsgrad", "float64", "master", "int4"],
)  # fmt: skip
def test_what_8bit_state_cannot_do_is_refused_before_anything_moves(make, message):
    params = [torch.randn(5, 3).requires_grad_()]
    before = (params[0].data_ptr(), params[0].detach().clone())
    with pytest.raises(ValueError, match=message):
        make(params)
    assert params[0].data_ptr() == before[0] and torch.equal(params[0].detach(), before[1])


def test_amsgrad_switched_on_later_is_refused_before_the_step_moves_anything():
    params = _params()
    optimizer = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=1)
    saved = optimizer.state_dict()
    values = [p.detach().clone() for p in params]
    optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    optimizer.param_groups[0]["amsgrad"] = False
    saved["param_groups"][0]["amsgrad"] = True
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0]["amsgrad"]
    assert all(torch.equal(optimizer.state[params[0]][k], v) for k, v in state.items())


@pytest.mark.cudasim
@pytest.mark.parametrize(
    ("name", "options"),
    [("AdamW", {"lr": 1e-2}), ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True})],
    ids=["adamw", "sgd"],
)
def test_the_torch_optimizers_step_8bit_state_with_the_cuda_kernels(name, options, monkeypatch):
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        params = [p.detach()[:2].clone().requires_grad_() for p in _params()[:2]]
        optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **options)
        _run(optimizer, params, seed=1, steps=2)
        results.append((params, [optimizer.state[p] for p in params]))
    for param_cpu, param_cuda in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(param_cuda, param_cpu, rtol=1e-6, atol=1e-7)
    for state_cpu, state_cuda in zip(results[0][1], results[1][1]):
        for key, value in state_cpu.items():
            got, want = state_cuda[key].numpy(), value.numpy()
            if got.dtype == np.float32:
                np.testing.assert_allclose(got, want, rtol=1e-6)
            else:
                _assert_codes_agree(got.reshape(-1), want.reshape(-1))


# --- SGD with an 8-bit momentum buffer ---------------------------------------------------


def _reference_sgd_step(param, grad, codes, first, lr, momentum, dampening, weight_decay,
                        nesterov, maximize, convention):  # fmt: skip
    """One SGD-momentum step in NumPy float32, in `rules.sgd.momentum`'s order, from the
    decoded buffer; returns the new param and the buffer's new (codes, absmax)."""
    mu, kept, factor, l2, velocity_scale, update_scale = rules.sgd.momentum_coefficients(
        np.dtype(np.float32), lr, momentum, dampening, weight_decay, maximize, convention
    )
    direction = factor * grad
    if l2 != 0:
        direction = direction + l2 * param
    direction = velocity_scale * direction
    if first:
        velocity = direction
    else:
        velocity = mu * quantization.dequantize(*codes) + kept * direction
    step = direction + mu * velocity if nesterov else velocity
    return param - update_scale * step, quantization.quantize(velocity, True)


SGD_OPTIONS = [
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01, "nesterov": True,
     "maximize": False, "convention": "pytorch"},
    {"lr": 0.02, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.0, "nesterov": False,
     "maximize": True, "convention": "lr_folded"},
]  # fmt: skip


def _sgd_launch(kernels, params, grads, states, first, options):
    table = TensorTable([p.size for p in params], 4, np.float32, 1)
    for row, (param, grad, state) in enumerate(zip(params, grads, states)):
        table.addresses[row] = [p.ctypes.data for p in (param, grad, *state)]
    table.entry_values[:, 0] = first
    coefficients = rules.sgd.momentum_coefficients(
        np.dtype(np.float32), options["lr"], options["momentum"], options["dampening"],
        options["weight_decay"], options["maximize"], options["convention"],
    )  # fmt: skip
    kernels.sgd_momentum_blockwise(table, coefficients, options["nesterov"])


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=["nesterov-l2", "dampened-lr-folded"])
def test_the_cpu_sgd_loop_steps_as_the_float32_reference(options, threading, monkeypatch):
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    sizes = [1000, BLOCK, 3, 0, 5 * BLOCK + 1]
    params = [_awkward(n, seed=30 + n) for n in sizes]
    states = [_empty_state(n)[:2] for n in sizes]
    rng = np.random.default_rng(6)
    for step in range(1, 6):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        expected = [
            _reference_sgd_step(p.copy(), g, s, step == 1, **options)
            for p, g, s in zip(params, grads, states)
        ]
        _sgd_launch(cpu, params, grads, states, step == 1, options)
        for param, state, (wanted, wanted_state) in zip(params, states, expected):
            np.testing.assert_allclose(param, wanted, rtol=1e-6, atol=1e-7)
            _assert_codes_agree(state[0], wanted_state[0])
            np.testing.assert_allclose(state[1], wanted_state[1], rtol=1e-6)


@pytest.mark.cudasim
def test_the_cuda_sgd_kernel_steps_as_the_cpu_loop():
    sizes = [300, 5]
    start = [_awkward(n, seed=40 + n) for n in sizes]
    runs = []
    for target in (cpu, cuda_kernels()):
        params, states = [p.copy() for p in start], [_empty_state(n)[:2] for n in sizes]
        rng = np.random.default_rng(7)
        for step in (1, 2):
            grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            _sgd_launch(target, params, grads, states, step == 1, SGD_OPTIONS[0])
        runs.append((params, states))
    for (param_cpu, state_cpu), (param_cuda, state_cuda) in zip(zip(*runs[0]), zip(*runs[1])):
        np.testing.assert_allclose(param_cuda, param_cpu, rtol=1e-6, atol=1e-7)
        _assert_codes_agree(state_cuda[0], state_cpu[0])
        np.testing.assert_allclose(state_cuda[1], state_cpu[1], rtol=1e-6)


def _sgd_state_of(optimizer, param):
    state = optimizer.state[param]
    return [quantized._memory_order(state[key]).numpy().copy() for key in quantized.SGD_STATE_KEYS]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=["nesterov-l2", "dampened-lr-folded"])
def test_8bit_sgd_steps_every_parameter_as_the_reference(options):
    params = _params()
    kwargs = {k: v for k, v in options.items() if k != "convention"}
    optimizer = fastmomentum.SGD(
        params, momentum_convention=options["convention"], state_dtype="int8_blockwise", **kwargs
    )
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        before = [
            _sgd_state_of(optimizer, p) if step > 1 else _empty_state(p.numel())[:2] for p in params
        ]
        values = [quantized._memory_order(p.detach()).numpy().copy() for p in params]
        _set_grads(params, generator)
        grads = [quantized._memory_order(p.grad).numpy() for p in params]
        optimizer.step()
        for param, value, grad, state in zip(params, values, grads, before):
            wanted, wanted_state = _reference_sgd_step(value, grad, state, step == 1, **options)
            got = quantized._memory_order(param.detach()).numpy()
            np.testing.assert_allclose(got, wanted, rtol=1e-6, atol=1e-7)
            codes, absmax = _sgd_state_of(optimizer, param)
            _assert_codes_agree(codes, wanted_state[0])
            np.testing.assert_allclose(absmax, wanted_state[1], rtol=1e-6)


def test_8bit_sgd_checkpoints_resume_and_convert_both_ways():
    params = _params()
    optimizer = fastmomentum.SGD(params, lr=0.05, momentum=0.9, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=2)
    saved = optimizer.state_dict()
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = fastmomentum.SGD(twins, lr=0.05, momentum=0.9, state_dtype="int8_blockwise")
    resumed.load_state_dict(saved)
    _run(optimizer, params, seed=2, steps=2)
    _run(resumed, twins, seed=2, steps=2)
    assert all(torch.equal(p, t) for p, t in zip(params, twins))
    # into torch.optim.SGD, decoded; and a float32 buffer back into 8 bits, quantized
    reference = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    reference.load_state_dict(fastmomentum.dequantized_state_dict(optimizer.state_dict()))
    for param in params:
        state = optimizer.state[param]
        wanted = quantized.dequantize_moment(*(state[k] for k in quantized.SGD_STATE_KEYS))
        assert torch.equal(reference.state[param]["momentum_buffer"], wanted)
    _run(reference, params, seed=3, steps=1)
    resumed.load_state_dict(reference.state_dict())
    for param, twin in zip(params, twins):
        buffer = reference.state[param]["momentum_buffer"]
        codes, absmax = quantized.quantize_moment(buffer, param.stride(), True)
        assert torch.equal(resumed.state[twin]["momentum_buffer_codes"], codes)
        assert torch.equal(resumed.state[twin]["momentum_buffer_absmax"], absmax)


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
            state = _empty_state(array.size)  # exp_avg codes, absmax, exp_avg_sq codes, absmax
        else:
            options = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
            optimizer = fastmomentum.SGD([param], state_dtype="int8_blockwise", **options)
            state = _empty_state(array.size)[:2]
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
            for key, value in zip(optimizer.state_keys, ordered):  # codes, then absmax
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
    host = [_awkward(size, seed=50), np.ones(size, np.float32), *_empty_state(size)]
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
            _assert_codes_agree(got, array)


def test_8bit_state_goes_with_fused_zero_grad_deepcopy_and_new_param_groups():
    import copy

    params = _params()
    optimizer = fastmomentum.Adam(params[:2], lr=1e-2, state_dtype="int8_blockwise")
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = fastmomentum.Adam(
        twins[:2], lr=1e-2, state_dtype="int8_blockwise", fused_zero_grad=True
    )
    for optim, group in ((optimizer, params), (fused, twins)):
        optim.add_param_group({"params": group[2:], "lr": 3e-3})
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for param, twin, grad in zip(params, twins, grads):
            param.grad, twin.grad = grad.clone(), grad.clone()
        optimizer.step()
        fused.step()
        assert all((t.grad == 0).all() for t in twins)  # zeroed in the same pass
    copied = copy.deepcopy(optimizer)
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin)
        for key, value in optimizer.state[param].items():
            assert torch.equal(fused.state[twin][key], value)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    for param, copy_param in zip(params, copied_params):
        for key, value in optimizer.state[param].items():
            assert torch.equal(copied.state[copy_param][key], value)
        assert copied.state[copy_param]["exp_avg_codes"].data_ptr() != (
            optimizer.state[param]["exp_avg_codes"].data_ptr()
        )
