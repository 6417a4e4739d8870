"""Block-wise 8-bit optimizer state (``state_dtype="int8_blockwise"``).

The code maps are checked on values of every magnitude (round trip, error, ordering,
zeros, NaN), and checkpoints of the earlier signed map are refused. Every rule's
generated 8-bit loop is checked against its float32 loop on the decoded state (the same
numbers, encoded), its CUDA kernel against the CPU loop; Adam's and SGD's loops and
optimizers also against a NumPy float32 reference, step by step from their own state
(the loop divides by a reciprocal, ≤ 1 ulp, which may move a value that lies on a
rounding boundary by one code). Every optimizer with 8-bit state against itself with
float32 state over many steps, and through checkpoints in every direction."""

import functools
import io

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum import quantized
from fastmomentum.kernels import config, cpu, quantization, rules
from fastmomentum.kernels.api import cuda_kernels
from fastmomentum.kernels.steps import int8_blockwise
from fastmomentum.kernels.tables import TensorTable

from .cases import OPTIMIZERS, every_optimizer

BLOCK = quantization.BLOCK
ADAM_STATE_KEYS = quantized.keys(("exp_avg", "exp_avg_sq"))
SGD_STATE_KEYS = quantized.keys(("momentum_buffer",))


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
    if signed:  # the top code decodes to 127 · (a · (1/127)): a, or an ulp from it
        np.testing.assert_allclose(again_absmax, absmax, rtol=2**-22)
    else:
        np.testing.assert_array_equal(again_absmax, absmax)


def test_a_signed_code_is_within_half_a_step_of_its_value():
    """Signed state: a linear map, steps of a/127 (a: the block's absmax)."""
    values = _awkward(40 * BLOCK, seed=1)
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
    values = _awkward(40 * BLOCK, seed=1) ** 2
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
    """One table over every (param, state) entry: the codes of exp_avg, exp_avg_sq and
    (unused) max_exp_avg_sq, then their absmax (`steps.int8_blockwise`)."""
    table = TensorTable([p.size for p in params], 8, np.float32, 2)
    for row, (param, grad, state) in enumerate(zip(params, grads, states)):
        m, m_absmax, v, v_absmax = (array.ctypes.data for array in state)
        table.addresses[row] = [param.ctypes.data, grad.ctypes.data, m, v, 0, m_absmax, v_absmax, 0]
    dtype = np.dtype(np.float32)
    lr, betas = options["lr"], options["betas"]
    table.entry_values[:] = rules.adam.step_coefficients(dtype, step, lr, betas)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, options["eps"], options["weight_decay"], options["decoupled"],
        options["maximize"],
    )  # fmt: skip
    kernels.launch(table, int8_blockwise(rules.adam.STEP), coefficients, (False,))


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


# --- every rule's generated 8-bit loop and kernel ------------------------------------------

F32 = np.dtype(np.float32)


def _nadam_row(step):
    """NAdam's entry values at ``step``, its product of momentum coefficients before it
    taken over the earlier steps."""
    earlier = rules.nadam.momentum_cache(np.arange(1.0, step), 0.9, 4e-3)
    product = np.float32(np.prod(earlier))
    return rules.nadam.step_values([step], [product], 2e-3, (0.9, 0.999), 4e-3, np.float32)[1][0]


def _lamb_corrections(step):
    return rules.lamb.bias_corrections(F32, step, (0.9, 0.999), True)[0]


def _adam(step):
    return rules.adam.step_coefficients(F32, step, 1e-2, (0.9, 0.999))


#: Case -> (the rule's `Step`, coefficients, flag values, entry values at a step).
RULE_CASES = {
    "sgd-momentum": (
        rules.sgd.MOMENTUM,
        rules.sgd.momentum_coefficients(F32, 0.05, 0.9, 0.1, 0.01, False, "pytorch"),
        (False,),
        lambda step: [float(step == 1)],
    ),
    "sgd-nesterov-lr-folded": (
        rules.sgd.MOMENTUM,
        rules.sgd.momentum_coefficients(F32, 0.05, 0.9, 0.0, 0.0, True, "lr_folded"),
        (True,),
        lambda step: [float(step == 1)],
    ),
    "adamw": (
        rules.adam.STEP,
        rules.adam.coefficients(F32, 1e-2, (0.9, 0.999), 1e-8, 0.1, True, False),
        (False,),
        _adam,
    ),
    "adam-amsgrad-l2": (
        rules.adam.STEP,
        rules.adam.coefficients(F32, 1e-2, (0.9, 0.999), 1e-8, 0.01, False, True),
        (True,),
        _adam,
    ),
    "nadam": (
        rules.nadam.STEP,
        rules.nadam.coefficients(F32, 2e-3, (0.9, 0.999), 1e-8, 0.01, True, False),
        (),
        _nadam_row,
    ),
    "rmsprop": (
        rules.rmsprop.STEP,
        rules.rmsprop.coefficients(F32, 1e-2, 0.99, 1e-8, 0.01, 0.0, False),
        (False, False),
        lambda step: [],
    ),
    "rmsprop-momentum": (
        rules.rmsprop.STEP,
        rules.rmsprop.coefficients(F32, 1e-2, 0.99, 1e-8, 0.0, 0.9, True),
        (True, False),
        lambda step: [],
    ),
    "rmsprop-centered-momentum": (
        rules.rmsprop.STEP,
        rules.rmsprop.coefficients(F32, 1e-2, 0.9, 1e-8, 0.0, 0.9, False),
        (True, True),
        lambda step: [],
    ),
    "adagrad": (
        rules.adagrad.STEP,
        rules.adagrad.coefficients(F32, 1e-10, 0.01, False),
        (),
        lambda step: rules.adagrad.step_coefficients_per_entry(F32, [step], 1e-2, 1e-3)[0],
    ),
    "lamb-direction": (
        rules.lamb.DIRECTION,
        rules.lamb.coefficients(F32, (0.9, 0.999), 1e-6, 0.01, False),
        (False, False),  # the moments are codes, not 16-bit values
        _lamb_corrections,
    ),
    "lamb-apply": (
        rules.lamb.APPLY,
        rules.lamb.apply_coefficients(F32, 1e-6, 0.01),
        (),
        lambda step: [*_lamb_corrections(step), -1e-2],
    ),
}


def _used(step, flags):
    """The state arrays a launch of ``step`` with ``flags`` reads (its optional ones
    only with their flag)."""
    on = dict(zip(step.flags, flags))
    return [name for name in step.state if on.get(step.optional_flag(name), True)]


def _start_state(step, used, sizes, seed):
    """Per state array, per entry: (codes, absmax) of values ``x`` of many magnitudes
    (one ``x`` per entry): ``x/10`` for signed codes, ``x² + 1`` for non-negative ones
    (so RMSprop's centered variance ``s − ḡ²`` stays positive)."""
    values = [_awkward(n, seed=seed + n) for n in sizes]
    state = {}
    for name in used:
        signed = step.code_kind(name) == "signed"
        state[name] = [
            quantization.quantize(x / 10 if signed else x * x + 1, signed) for x in values
        ]
    return state


def _tables(step, params, grads, columns, entry_row, width):
    """A launch table over the entries: params, grads, then ``columns`` (per column,
    None or an array per entry)."""
    table = TensorTable([p.size for p in params], 2 + len(columns), np.float32, width)
    for row, (param, grad) in enumerate(zip(params, grads)):
        addresses = [param.ctypes.data, grad.ctypes.data]
        addresses += [0 if c is None else c[row].ctypes.data for c in columns]
        table.addresses[row] = addresses
    table.entry_values[:] = np.asarray(entry_row, np.float32).reshape(1, width)
    return table


def _run_rule(kernels, case, params, state, grads, step_count):
    """One step of ``case`` over 8-bit ``state`` by ``kernels``; returns its sums of
    squares (or None)."""
    step, coefficients, flags, entry_row = RULE_CASES[case]
    columns = [[c for c, _ in state[n]] if n in state else None for n in step.state]
    columns += [[a for _, a in state[n]] if n in state else None for n in step.state]
    row = entry_row(step_count)
    table = _tables(step, params, grads, columns, row, step.entry_width)
    return kernels.launch(table, int8_blockwise(step), coefficients, flags)


@functools.cache
def _float32_twin(step):
    """The float32 `steps.Step` of the rule ``step``'s 8-bit loop runs
    (`steps.Step.blockwise_rule`, else its rule); one object per step, kept alive, as
    `cpu.launch` keys its variants on the step's id."""
    if step.blockwise_rule is None:
        return step
    return step._replace(name=f"{step.name}_blockwise", rule=step.blockwise_rule)


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_8bit_loop_is_the_float32_loop_on_the_decoded_state(case, threading, monkeypatch):
    """Every rule's generated 8-bit CPU loop, over 6 steps of random data, against its
    generated float32 loop (tested against torch and float64 references elsewhere) run
    on the 8-bit state decoded: the same params and sums of squares, and the codes and
    absmax of the same new state encoded block by block, exactly: both run one rule on
    the same float32 values (the 8-bit loops' rule, `steps.Step.blockwise_rule` where a
    step has one). The sums of squares (LAMB's norms) add float32 squares in
    float32 chunks of 256 elements (a block) against 2048 (`cpu.SQUARES_CHUNK`), so
    they differ by float32 roundings: 1e-6 relative (measured: 1.2e-7)."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    step, coefficients, flags, entry_row = RULE_CASES[case]
    float32_step = _float32_twin(step)
    sizes = [1000, BLOCK, 3, 0, 5 * BLOCK + 1]
    params = [_awkward(n, seed=60 + n) for n in sizes]
    used = _used(step, flags)
    state = _start_state(step, used, sizes, seed=70)
    rng = np.random.default_rng(8)
    for count in range(1, 7):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        decoded = {n: [quantization.dequantize(*pair) for pair in state[n]] for n in used}
        twins = [p.copy() for p in params]
        columns = [decoded.get(name) for name in step.state]
        table = _tables(step, twins, grads, columns, entry_row(count), step.entry_width)
        sums = cpu.launch(table, float32_step, coefficients, flags)
        sums_8bit = _run_rule(cpu, case, params, state, grads, count)
        for param, twin in zip(params, twins):
            np.testing.assert_array_equal(param, twin)
        for name in used:
            signed = step.code_kind(name) == "signed"
            for (codes, absmax), values in zip(state[name], decoded[name]):
                want_codes, want_absmax = quantization.quantize(values, signed)
                np.testing.assert_array_equal(codes, want_codes, err_msg=name)
                np.testing.assert_array_equal(absmax, want_absmax, err_msg=name)
        if step.squares:
            np.testing.assert_allclose(sums_8bit, sums, rtol=1e-6)


@pytest.mark.cudasim
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_8bit_kernel_steps_as_the_8bit_cpu_loop(case):
    """The generated CUDA kernels (a CUDA block per block of state, its absmax and sums
    of squares reduced in shared memory) against the CPU loops, 2 steps: params to 1e-6
    (the CPU loops may divide by a reciprocal, ≤ 1 ulp), absmax to 1e-6, codes within a
    level where a value lies on a rounding boundary (`_assert_codes_agree`), sums to
    1e-6 (float32 terms summed in another order)."""
    step, _, flags, _ = RULE_CASES[case]
    sizes = [300, 5]
    used = _used(step, flags)
    runs = []
    for kernels in (cpu, cuda_kernels()):
        params = [_awkward(n, seed=80 + n) for n in sizes]
        state = _start_state(step, used, sizes, seed=90)
        rng = np.random.default_rng(9)
        sums = []
        for count in (1, 2):
            grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            sums.append(_run_rule(kernels, case, params, state, grads, count))
        runs.append((params, state, sums))
    (params_cpu, state_cpu, sums_cpu), (params_cuda, state_cuda, sums_cuda) = runs
    for param_cpu, param_cuda in zip(params_cpu, params_cuda):
        np.testing.assert_allclose(param_cuda, param_cpu, rtol=1e-6, atol=1e-7)
    for name in used:
        for (codes_cpu, absmax_cpu), (codes_cuda, absmax_cuda) in zip(
            state_cpu[name], state_cuda[name]
        ):
            _assert_codes_agree(codes_cuda, codes_cpu)
            np.testing.assert_allclose(absmax_cuda, absmax_cpu, rtol=1e-6)
    if step.squares:
        np.testing.assert_allclose(np.array(sums_cuda), np.array(sums_cpu), rtol=1e-6)


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


def _run(optimizer, params, seed, steps):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _set_grads(params, generator)
        optimizer.step()


#: The cases every optimizer with 8-bit state runs (RMSprop not centered: refused).
every_8bit_optimizer = every_optimizer(
    lambda info: info.supports_quantized_state,
    cases={"SGD": ("sgd", "nesterov"), "Adam": ("adam-amsgrad",), "RMSprop": ("rmsprop-momentum",)},
)


def _moments_of(optimizer, param):
    """The state names ``state[param]`` holds as codes and absmax."""
    state = optimizer.state[param]
    return [name for name, (codes, _, _) in quantized.MOMENTS.items() if codes in state]


def _noisy_quadratic(name, options, state_dtype, steps):
    """``steps`` steps on ``½‖p − target‖²`` with Gaussian noise of std 0.5 in each
    gradient (the same targets and noise for every run); the params before and after."""
    generator = torch.Generator().manual_seed(0)
    shapes = [*SHAPES, (300,), (0,)]
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    targets = [torch.randn(shape, generator=generator) for shape in shapes]
    start = [p.detach().clone() for p in params]
    optimizer = getattr(fastmomentum, name)(params, state_dtype=state_dtype, **options)
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param, target in zip(params, targets):
            param.grad = param.detach() - target + 0.5 * torch.randn(param.shape, generator=noise)
        optimizer.step()
    return start, [p.detach() for p in params]


@every_8bit_optimizer
def test_8bit_state_trains_as_float32_state(name, options):
    """200 steps from the same start, the same gradients (a noisy quadratic), against
    float32 state: each tensor ends within 10% of the distance the float32 run moved it.

    Why 10%: every code is within 1/16 of its value (above), so a step computed from
    8-bit state is within about 1/16 (the first moment, a momentum buffer) + 1/32 (the
    square root of a second moment) ≈ 9.4% of the step float32 state gives; the states'
    averages then keep such errors from adding up. Measured: 0.5-6.1% (SGD ≈ 1%, the
    Adam family, Adagrad and LAMB 2-6%); a one-element tensor (its block's absmax, kept
    exactly) 0."""
    start, full = _noisy_quadratic(name, options, None, 200)
    _, low = _noisy_quadratic(name, options, "int8_blockwise", 200)
    for first, want, got in zip(start, full, low):
        moved = float((want - first).norm())
        assert moved > 0 or first.numel() == 0
        assert float((got - want).norm()) <= 0.1 * moved, (name, tuple(first.shape))


@every_8bit_optimizer
def test_8bit_state_pieces_keep_the_parameters_layout_and_a_storage_each(name, options):
    params = _params()
    optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **options)
    _run(optimizer, params, seed=1, steps=1)
    storages = set()
    for param in params:
        state = optimizer.state[param]
        moments = _moments_of(optimizer, param)
        assert moments and set(state) == {*optimizer.scalar_state, *quantized.keys(moments)}
        for moment in moments:
            codes, absmax, signed = quantized.MOMENTS[moment]
            assert state[codes].dtype == (torch.int8 if signed else torch.uint8)
            assert state[codes].stride() == param.stride()
            assert state[absmax].shape == (quantization.blocks(param.numel()),)
            assert state[absmax].dtype == torch.float32
        storages.update(value.untyped_storage().data_ptr() for value in state.values())
    assert len(storages) == sum(len(optimizer.state[p]) for p in params)  # each its own


@every_8bit_optimizer
def test_an_8bit_run_resumes_bit_identically_from_its_checkpoint(name, options):
    info = OPTIMIZERS[name]
    # bfloat16 params (the absmax stays float32), but not for NAdam: torch's load casts
    # its mu_product to the params' dtype (torch.optim.NAdam's resume too)
    bfloat16 = info.steps(torch.bfloat16) and set(info.scalar_state) == {"step"}
    for dtype in [torch.float32] + [torch.bfloat16] * bfloat16:
        params = _params(dtype)
        make = getattr(fastmomentum, name)
        optimizer = make(params, state_dtype="int8_blockwise", **options)
        _run(optimizer, params, seed=1, steps=3)
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        twins = [p.detach().clone().requires_grad_() for p in params]
        resumed = make(twins, state_dtype="int8_blockwise", **options)
        buffer.seek(0)
        resumed.load_state_dict(torch.load(buffer))
        _assert_same_state(optimizer, params, resumed, twins)
        _run(optimizer, params, seed=2, steps=3)
        _run(resumed, twins, seed=2, steps=3)
        assert all(torch.equal(p, t) for p, t in zip(params, twins))
        _assert_same_state(optimizer, params, resumed, twins)


def _assert_same_state(optimizer, params, other, other_params):
    for param, twin in zip(params, other_params):
        assert set(other.state[twin]) == set(optimizer.state[param])
        for key, value in optimizer.state[param].items():
            assert torch.equal(other.state[twin][key], value), key


@every_8bit_optimizer
def test_8bit_checkpoints_convert_both_ways_and_torch_loads_them_decoded(name, options):
    """A float32 checkpoint (torch.optim's where it has the optimizer) loads into 8-bit
    state quantized block by block, as a step would store it; an 8-bit one loads into
    float32 state decoded: ours directly, torch's through `dequantized_state_dict`."""
    params = _params()
    info = OPTIMIZERS[name]
    library = torch.optim if info.peer is not None else fastmomentum
    full = getattr(library, name)(params, **options)
    _run(full, params, seed=1, steps=3)
    low = info.cls(params, state_dtype="int8_blockwise", **options)
    low.load_state_dict(full.state_dict())
    for param in params:
        moments = _moments_of(low, param)
        assert moments
        for moment in moments:
            codes, absmax, signed = quantized.MOMENTS[moment]
            wanted = quantized.quantize_moment(full.state[param][moment], param.stride(), signed)
            assert torch.equal(low.state[param][codes], wanted[0])
            assert torch.equal(low.state[param][absmax], wanted[1])
        for scalar in low.scalar_state:  # step, mu_product
            assert torch.equal(low.state[param][scalar], full.state[param][scalar])
    saved = low.state_dict()
    decoded = fastmomentum.dequantized_state_dict(saved)
    kept = [key for key in saved["state"][0] if key not in low.scalar_state]
    assert kept and all(key.endswith(("_codes", "_absmax")) for key in kept)
    targets = [(info.cls(params, **options), saved)]
    if info.peer is not None:
        targets.append((info.peer(params, **options), decoded))
    for target, state_dict in targets:
        target.load_state_dict(state_dict)
        for param in params:
            state = low.state[param]
            for moment in _moments_of(low, param):
                codes, absmax, _ = quantized.MOMENTS[moment]
                wanted = quantized.dequantize_moment(state[codes], state[absmax])
                assert torch.equal(target.state[param][moment], wanted)
                assert target.state[param][moment].stride() == param.stride()
        _run(target, params, seed=3, steps=1)  # and steps on


def test_8bit_checkpoints_of_the_earlier_signed_code_map_are_refused_untouched():
    """State dicts name their code maps in their groups; one with signed codes and no
    name holds the tiny-float codes of fastmomentum before the linear map, which this
    version would misread: every way of loading it refuses it, changing nothing."""
    params = _params()
    adam = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _run(adam, params, seed=1, steps=2)
    saved = adam.state_dict()
    assert all(g[quantized.CODE_MAPS_KEY] == quantized.CODE_MAPS for g in saved["param_groups"])
    assert quantized.CODE_MAPS_KEY not in adam.param_groups[0]  # only in what is saved
    old = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    for group in old["param_groups"]:
        del group[quantized.CODE_MAPS_KEY]
    before = [state["exp_avg_codes"].clone() for state in adam.state.values()]
    for target in (adam, fastmomentum.Adam(params)):
        with pytest.raises(ValueError, match="tiny float used before the linear map"):
            target.load_state_dict(old)
    with pytest.raises(ValueError, match="dequantized_state_dict"):
        fastmomentum.dequantized_state_dict(old)
    after = [state["exp_avg_codes"] for state in adam.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    adam.load_state_dict(saved)  # its own state dict loads, and a float32 one without codes
    fastmomentum.Adam(params, state_dtype="int8_blockwise").load_state_dict(
        fastmomentum.dequantized_state_dict(saved)
    )


def test_8bit_adagrad_starts_every_sum_at_the_initial_value():
    params = _params()
    optimizer = fastmomentum.Adagrad(
        params, initial_accumulator_value=0.3, state_dtype="int8_blockwise"
    )
    for param in params:  # from construction, as torch's: the top code on absmax 0.3
        state = optimizer.state[param]
        wanted = torch.full(param.shape, 0.3, dtype=torch.float32)
        sums = quantized.dequantize_moment(state["sum_codes"], state["sum_absmax"])
        assert torch.equal(sums, wanted)
        assert (state["sum_codes"] == 255).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: fastmomentum.RMSprop(p, centered=True, state_dtype="int8_blockwise"),
         "centered=True is not implemented"),
        (lambda p: fastmomentum.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                                     state_dtype="int8_blockwise"),
         "is for float32, bfloat16, float16 parameters"),
        (lambda p: fastmomentum.LAMB([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                                     state_dtype="int8_blockwise"),
         "is for float32, bfloat16, float16 parameters"),
        (lambda p: fastmomentum.LAMB([p[0].detach().bfloat16().requires_grad_()],
                                     master_weights=True, state_dtype="int8_blockwise"),
         "master_weights"),
        (lambda p: fastmomentum.Adam(p, master_weights=True, state_dtype="int8_blockwise"),
         "master_weights"),
        (lambda p: fastmomentum.Adam(p, state_dtype="int4"), "state_dtype must be None"),
    ],
    ids=["rmsprop-centered", "float64", "lamb-float64", "lamb-master", "master", "int4"],
)  # fmt: skip
def test_what_8bit_state_cannot_do_is_refused_before_anything_moves(make, message):
    params = [torch.randn(5, 3).requires_grad_()]
    before = (params[0].data_ptr(), params[0].detach().clone())
    with pytest.raises(ValueError, match=message):
        make(params)
    assert params[0].data_ptr() == before[0] and torch.equal(params[0].detach(), before[1])


def test_centered_switched_on_later_is_refused_before_the_step_moves_anything():
    params = _params()
    optimizer = fastmomentum.RMSprop(params, momentum=0.9, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=1)
    saved = optimizer.state_dict()
    values = [p.detach().clone() for p in params]
    optimizer.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered"):
        optimizer.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    optimizer.param_groups[0]["centered"] = False
    saved["param_groups"][0]["centered"] = True
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    with pytest.raises(ValueError, match="centered"):
        optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0]["centered"]
    assert all(torch.equal(optimizer.state[params[0]][k], v) for k, v in state.items())


def test_amsgrad_switched_on_later_starts_its_8bit_maximum_at_zero():
    """As with float32 state (where torch raises KeyError): the first AMSGrad step's
    maximum is max(0, v) = v, so its codes and absmax are ``exp_avg_sq``'s."""
    params = _params()
    optimizer = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=2)
    assert "max_exp_avg_sq_codes" not in optimizer.state[params[0]]
    optimizer.param_groups[0]["amsgrad"] = True
    _run(optimizer, params, seed=2, steps=1)
    for param in params:
        state = optimizer.state[param]
        assert torch.equal(state["max_exp_avg_sq_codes"], state["exp_avg_sq_codes"])
        assert torch.equal(state["max_exp_avg_sq_absmax"], state["exp_avg_sq_absmax"])
    optimizer.param_groups[0]["amsgrad"] = False  # kept, as torch keeps max_exp_avg_sq
    _run(optimizer, params, seed=3, steps=1)
    assert "max_exp_avg_sq_codes" in optimizer.state_dict()["state"][0]


@pytest.mark.cudasim
@every_8bit_optimizer
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
        assert set(state_cuda) == set(state_cpu)
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
    step = int8_blockwise(rules.sgd.MOMENTUM)
    kernels.launch(table, step, coefficients, (options["nesterov"],))


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


def _sgd_state_of(optimizer, param):
    state = optimizer.state[param]
    return [quantized._memory_order(state[key]).numpy().copy() for key in SGD_STATE_KEYS]


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
