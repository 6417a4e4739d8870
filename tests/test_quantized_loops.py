"""Block-wise 8-bit state: the generated loops and kernels. Every rule's 8-bit loop is
checked against its float32 loop on the decoded state (the same numbers, encoded), its
CUDA kernel against the CPU loop; Adam's and SGD's loops also against a NumPy float32
reference, step by step from their own state (the loop divides by a reciprocal, ≤ 1
ulp, which may move a value that lies on a rounding boundary by one code)."""

import functools

import numpy as np
import pytest

from fastmomentum.kernels import config, cpu, quantization, rules
from fastmomentum.kernels.calls import cuda_kernels
from fastmomentum.kernels.specs import int8_blockwise
from fastmomentum.kernels.tables import TensorTable

from .int8_references import (
    BLOCK,
    OPTIONS,
    SGD_OPTIONS,
    assert_codes_agree,
    awkward,
    empty_state,
    reference_sgd_step,
    reference_step,
)

# --- the kernels -----------------------------------------------------------------------


def _launch(kernels, params, grads, states, step, options):
    """One table over every (param, state) entry: the codes of exp_avg, exp_avg_sq and
    (unused) max_exp_avg_sq, then their absmax (`specs.int8_blockwise`)."""
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
    kernels.launch(table, int8_blockwise(rules.adam.SPEC), coefficients, (False,))


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("options", OPTIONS, ids=["adamw", "adam-l2-maximize"])
def test_the_cpu_loop_steps_as_the_float32_reference(options, threading, monkeypatch):
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    sizes = [1000, BLOCK, 3, 0, 5 * BLOCK + 1]
    params = [awkward(n, seed=10 + n) for n in sizes]
    states = [empty_state(n) for n in sizes]
    rng = np.random.default_rng(4)
    for step in range(1, 6):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        expected = [
            reference_step(p.copy(), g, s, step, **options)
            for p, g, s in zip(params, grads, states)
        ]
        _launch(cpu, params, grads, states, step, options)
        for param, state, (wanted, wanted_state) in zip(params, states, expected):
            np.testing.assert_allclose(param, wanted, rtol=1e-6, atol=1e-7)
            for got, want in zip(state, wanted_state):
                if got.dtype == np.float32:  # absmax: of the same float32 moments
                    np.testing.assert_allclose(got, want, rtol=1e-6)
                else:
                    assert_codes_agree(got, want)


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


#: Case -> (the rule's `KernelSpec`, coefficients, flag values, entry values at a step).
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
        rules.adam.SPEC,
        rules.adam.coefficients(F32, 1e-2, (0.9, 0.999), 1e-8, 0.1, True, False),
        (False,),
        _adam,
    ),
    "adam-amsgrad-l2": (
        rules.adam.SPEC,
        rules.adam.coefficients(F32, 1e-2, (0.9, 0.999), 1e-8, 0.01, False, True),
        (True,),
        _adam,
    ),
    "nadam": (
        rules.nadam.SPEC,
        rules.nadam.coefficients(F32, 2e-3, (0.9, 0.999), 1e-8, 0.01, True, False),
        (),
        _nadam_row,
    ),
    "radam": (  # steps 5 and on: the first not rectified, the later ones rectified
        rules.radam.SPEC,
        rules.radam.coefficients(F32, 1e-2, (0.9, 0.999), 1e-8, 0.01, False, False),
        (),
        lambda step: rules.radam.step_values([step + 4], 1e-2, (0.9, 0.999))[0],
    ),
    "adamax": (
        rules.adamax.SPEC,
        rules.adamax.coefficients(F32, (0.9, 0.999), 1e-8, 0.01, True),
        (),
        lambda step: rules.adamax.step_coefficients_per_entry(F32, [step], 2e-3, (0.9, 0.999))[0],
    ),
    "rmsprop": (
        rules.rmsprop.SPEC,
        rules.rmsprop.coefficients(F32, 1e-2, 0.99, 1e-8, 0.01, 0.0, False),
        (False, False),
        lambda step: [],
    ),
    "rmsprop-momentum": (
        rules.rmsprop.SPEC,
        rules.rmsprop.coefficients(F32, 1e-2, 0.99, 1e-8, 0.0, 0.9, True),
        (True, False),
        lambda step: [],
    ),
    "rmsprop-centered-momentum": (
        rules.rmsprop.SPEC,
        rules.rmsprop.coefficients(F32, 1e-2, 0.9, 1e-8, 0.0, 0.9, False),
        (True, True),
        lambda step: [],
    ),
    "adagrad": (
        rules.adagrad.SPEC,
        rules.adagrad.coefficients(F32, 1e-10, 0.01, False),
        (),
        lambda step: rules.adagrad.step_coefficients_per_entry(F32, [step], 1e-2, 1e-3)[0],
    ),
    "lion": (
        rules.lion.SPEC,
        rules.lion.coefficients(F32, 1e-3, (0.9, 0.99), 0.1, False),
        (),
        lambda step: [],
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


def _used(spec, flags):
    """The state arrays a launch of ``spec`` with ``flags`` reads (its optional ones
    only with their flag)."""
    on = dict(zip(spec.flags, flags))
    return [name for name in spec.state if on.get(spec.optional_flag(name), True)]


def _start_state(spec, used, sizes, seed):
    """Per state array, per entry: (codes, absmax) of values ``x`` of many magnitudes
    (one ``x`` per entry): ``x/10`` for signed codes, ``x² + 1`` for non-negative ones
    (so RMSprop's centered variance ``s − ḡ²`` stays positive)."""
    values = [awkward(n, seed=seed + n) for n in sizes]
    state = {}
    for name in used:
        signed = spec.code_kind(name) == "signed"
        state[name] = [
            quantization.quantize(x / 10 if signed else x * x + 1, signed) for x in values
        ]
    return state


def _tables(spec, params, grads, columns, entry_row, width):
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
    spec, coefficients, flags, entry_row = RULE_CASES[case]
    columns = [[c for c, _ in state[n]] if n in state else None for n in spec.state]
    columns += [[a for _, a in state[n]] if n in state else None for n in spec.state]
    row = entry_row(step_count)
    table = _tables(spec, params, grads, columns, row, spec.entry_width)
    return kernels.launch(table, int8_blockwise(spec), coefficients, flags)


@functools.cache
def _float32_twin(spec):
    """The float32 `specs.KernelSpec` of the rule ``spec``'s 8-bit loop runs
    (`specs.KernelSpec.blockwise_rule`, else its rule); one object per spec, as
    `cpu.launch` keeps one variant per spec name."""
    if spec.blockwise_rule is None:
        return spec
    return spec._replace(name=f"{spec.name}_blockwise", rule=spec.blockwise_rule)


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_8bit_loop_is_the_float32_loop_on_the_decoded_state(case, threading, monkeypatch):
    """Every rule's generated 8-bit CPU loop, over 6 steps of random data, against its
    generated float32 loop (tested against torch and float64 references elsewhere) run
    on the 8-bit state decoded: the same params and sums of squares, and the codes and
    absmax of the same new state encoded block by block, exactly: both run one rule on
    the same float32 values (the 8-bit loops' rule, `specs.KernelSpec.blockwise_rule` where a
    step has one). The sums of squares (LAMB's norms) add float32 squares in
    float32 chunks of 256 elements (a block) against 2048 (`cpu.SQUARES_CHUNK`), so
    they differ by float32 roundings: 1e-6 relative (measured: 1.2e-7)."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    spec, coefficients, flags, entry_row = RULE_CASES[case]
    float32_spec = _float32_twin(spec)
    sizes = [1000, BLOCK, 3, 0, 5 * BLOCK + 1]
    params = [awkward(n, seed=60 + n) for n in sizes]
    used = _used(spec, flags)
    state = _start_state(spec, used, sizes, seed=70)
    rng = np.random.default_rng(8)
    for count in range(1, 7):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        decoded = {n: [quantization.dequantize(*pair) for pair in state[n]] for n in used}
        twins = [p.copy() for p in params]
        columns = [decoded.get(name) for name in spec.state]
        table = _tables(spec, twins, grads, columns, entry_row(count), spec.entry_width)
        sums = cpu.launch(table, float32_spec, coefficients, flags)
        sums_8bit = _run_rule(cpu, case, params, state, grads, count)
        for param, twin in zip(params, twins):
            np.testing.assert_array_equal(param, twin)
        for name in used:
            signed = spec.code_kind(name) == "signed"
            for (codes, absmax), values in zip(state[name], decoded[name]):
                want_codes, want_absmax = quantization.quantize(values, signed)
                np.testing.assert_array_equal(codes, want_codes, err_msg=name)
                np.testing.assert_array_equal(absmax, want_absmax, err_msg=name)
        if spec.squares:
            np.testing.assert_allclose(sums_8bit, sums, rtol=1e-6)


@pytest.mark.cudasim
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_8bit_kernel_steps_as_the_8bit_cpu_loop(case):
    """The generated CUDA kernels (a warp per block of state, its absmax reduced by
    shuffles, `kernels.cuda_blockwise`) against the CPU loops, 2 steps: params to 1e-6
    (the CPU loops may divide by a reciprocal, ≤ 1 ulp), absmax to 1e-6, codes within a
    level where a value lies on a rounding boundary (`assert_codes_agree`), sums to
    1e-6 (float32 terms summed in another order)."""
    _compare_kernel_with_loop(case, [300, 5])


@pytest.mark.cudasim
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_8bit_kernel_over_several_blocks_per_segment(case, monkeypatch):
    """As above, with CUDA blocks of four warps, so segments of four blocks of state
    (`config.BLOCKWISE_WARPS`), and more segments than CUDA blocks (grid-stride): each
    warp steps its own block, a warp whose block lies past its entry's end idles (its
    lanes still take part in the shuffles), the warps' sums of squares add up in shared
    memory, and each entry's last block is ragged (a size no multiple of `BLOCK`) or
    whole."""
    monkeypatch.setattr(config, "BLOCKWISE_WARPS", 4)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 1)
    _compare_kernel_with_loop(case, [5 * BLOCK + 37, BLOCK, 100])


def _compare_kernel_with_loop(case, sizes):
    """Two steps of ``case`` over entries of ``sizes`` elements, by the CUDA kernel and
    by the CPU loop, from the same state: the same numbers (tolerances above)."""
    spec, _, flags, _ = RULE_CASES[case]
    used = _used(spec, flags)
    runs = []
    for kernels in (cpu, cuda_kernels()):
        params = [awkward(n, seed=80 + n) for n in sizes]
        state = _start_state(spec, used, sizes, seed=90)
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
            assert_codes_agree(codes_cuda, codes_cpu)
            np.testing.assert_allclose(absmax_cuda, absmax_cpu, rtol=1e-6)
    if spec.squares:
        np.testing.assert_allclose(np.array(sums_cuda), np.array(sums_cpu), rtol=1e-6)


# --- the 8-bit loops' rules against their steps' rules ------------------------------------

#: Case -> per kind of values (awkward, standard normal): the share of parameter elements
#: apart per step and the most ulps apart, as measured on an Intel Xeon (AVX-512) at 1e-2
#: learning rate (2e-3 for NAdam), bounded here with a margin of a quarter for the share.
#: The moments are the same in every case, and for SGD, Adamax and Adagrad the
#: parameters too.
BLOCKWISE_APART = {
    "adamw": {"awkward": (0.0185, 4), "normal": (0.0039, 4)},
    "adam-amsgrad-l2": {"awkward": (0.0132, 4), "normal": (0.0038, 4)},
    "nadam": {"awkward": (0.0266, 32), "normal": (0.0024, 8)},
    "radam": {"awkward": (0.0061, 6), "normal": (0.00043, 6)},
}


@pytest.mark.parametrize("values", ["awkward", "normal"])
@pytest.mark.parametrize(
    "case", [case for case, (spec, *_) in RULE_CASES.items() if spec.blockwise_rule]
)
def test_each_blockwise_rule_is_its_rule_but_for_the_rounding_of_the_step(case, values):
    """A step's `specs.KernelSpec.blockwise_rule` (no test of λ or of the lerp's weight,
    a hoisted reciprocal where its rule divides by a loop invariant) against its rule, in
    generated float32 loops, 10 steps of 2^20 elements, each step from the rule's state:
    the moments bit for bit (but the sign of a zero); the parameters bit for bit where
    the rule only drops tests (SGD, Adamax, Adagrad), else apart in at most the measured
    share of elements
    (`BLOCKWISE_APART`) by at most the measured ulps of the larger of the values before
    and after the step. Where the step is small against the parameter the rate is
    small; awkward values (many magnitudes) include parameters the step exceeds."""
    spec, coefficients, flags, entry_row = RULE_CASES[case]
    size = 1 << 20
    rng = np.random.default_rng(12)
    if values == "awkward":
        param = awkward(size, seed=12)
    else:
        param = rng.standard_normal(size).astype(np.float32)
    used = _used(spec, flags)
    state = {name: np.zeros(size, np.float32) for name in used}
    apart, most_ulps = 0, 0.0
    for count in range(1, 11):
        grad = rng.standard_normal(size).astype(np.float32)
        stepped = []
        for variant in (spec, _float32_twin(spec)):
            p, s = param.copy(), {name: array.copy() for name, array in state.items()}
            columns = [[s[name]] if name in s else None for name in spec.state]
            table = _tables(spec, [p], [grad], columns, entry_row(count), spec.entry_width)
            cpu.launch(table, variant, coefficients, flags)
            stepped.append((p, s))
        (p, s), (p_blockwise, s_blockwise) = stepped
        for name in used:
            np.testing.assert_array_equal(s_blockwise[name], s[name], err_msg=name)
        differ = p_blockwise != p
        apart += int(differ.sum())
        if differ.any():
            larger = np.maximum.reduce([np.abs(param), np.abs(p), np.abs(p_blockwise)])
            ulps = np.abs(p_blockwise.astype(np.float64) - p) / np.spacing(larger)
            most_ulps = max(most_ulps, float(ulps[differ].max()))
        param, state = p, s
    rate, ulps_bound = BLOCKWISE_APART[case][values] if case in BLOCKWISE_APART else (0.0, 0)
    assert apart <= 1.25 * rate * 10 * size, f"{apart} of {10 * size} elements apart"
    assert most_ulps <= ulps_bound


# --- SGD with an 8-bit momentum buffer ---------------------------------------------------


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
    params = [awkward(n, seed=30 + n) for n in sizes]
    states = [empty_state(n)[:2] for n in sizes]
    rng = np.random.default_rng(6)
    for step in range(1, 6):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        expected = [
            reference_sgd_step(p.copy(), g, s, step == 1, **options)
            for p, g, s in zip(params, grads, states)
        ]
        _sgd_launch(cpu, params, grads, states, step == 1, options)
        for param, state, (wanted, wanted_state) in zip(params, states, expected):
            np.testing.assert_allclose(param, wanted, rtol=1e-6, atol=1e-7)
            assert_codes_agree(state[0], wanted_state[0])
            np.testing.assert_allclose(state[1], wanted_state[1], rtol=1e-6)
