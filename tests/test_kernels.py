"""The low-level API on NumPy arrays against the float64 references, and its input checks."""

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from fastmomentum.kernels import adam_step, adamw_step, config, cpu, rules, sgd_step

from . import reference
from .assertions import RTOL, assert_relative_close
from .cases import ADAM_CASES, SGD_CASES, adam_options, learning_rate, sgd_options

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 1001]  # empty, scalar-like, odd and larger than a thread's chunk
STEPS = 60


@pytest.fixture(autouse=True, params=["serial", "threaded"])
def cpu_loop(request, monkeypatch):
    """Every CPU test runs both loops: single-threaded (short arrays) and threaded."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if request.param == "serial" else 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("case", "convention"), list(itertools.product(SGD_CASES, ["pytorch", "lr_folded"]))
)
def test_sgd_step_matches_float64_reference(dtype, size, case, convention):
    rng = np.random.default_rng(size)
    param = rng.standard_normal(size).astype(dtype)
    velocity = np.zeros(size, dtype)
    expected_param, expected_velocity = param.astype(np.float64), velocity.astype(np.float64)
    options = sgd_options(case)
    for step in range(STEPS):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step)
        sgd_step(
            param,
            grad,
            velocity,
            lr=lr,
            first_step=step == 0,
            momentum_convention=convention,
            **options,
        )
        expected_param, expected_velocity = reference.sgd(
            expected_param,
            grad.astype(np.float64),
            expected_velocity,
            lr=lr,
            first_step=step == 0,
            lr_folded=convention == "lr_folded",
            **options,
        )
    tolerance = RTOL[np.dtype(dtype).name]
    assert_relative_close(param, expected_param, tolerance, "param")
    if case["momentum"]:
        assert_relative_close(velocity, expected_velocity, tolerance, "momentum_buffer")
    else:
        assert not velocity.any(), "momentum_buffer was written although momentum == 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_step_matches_float64_reference(dtype, size, case):
    rng = np.random.default_rng(size + 7)
    param = rng.standard_normal(size).astype(dtype)
    moments = [np.zeros(size, dtype) for _ in range(3)]
    expected = [param.astype(np.float64)] + [np.zeros(size) for _ in range(3)]
    options, decoupled = adam_options(case)
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        adam_step(
            param, grad, *moments, step=step, lr=lr, decoupled_weight_decay=decoupled, **options
        )
        expected = reference.adam(
            *expected[:1],
            grad.astype(np.float64),
            *expected[1:],
            step=step,
            lr=lr,
            decoupled=decoupled,
            **options,
        )
    tolerance = RTOL[np.dtype(dtype).name]
    names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for name, actual, wanted in zip(names, [param, *moments], expected):
        if name == "max_exp_avg_sq" and not options["amsgrad"]:
            assert not actual.any(), "max_exp_avg_sq was written without amsgrad"
            continue
        assert_relative_close(actual, wanted, tolerance, name)


def test_adamw_step_is_adam_with_decoupled_decay():
    rng = np.random.default_rng(3)
    param, grad = rng.standard_normal(257), rng.standard_normal(257)
    a = [param.copy(), np.zeros(257), np.zeros(257)]
    b = [param.copy(), np.zeros(257), np.zeros(257)]
    adamw_step(a[0], grad, a[1], a[2], step=1, lr=0.01)
    adam_step(
        b[0], grad, b[1], b[2], step=1, lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True
    )
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_multidimensional_contiguous_arrays_are_accepted():
    rng = np.random.default_rng(4)
    param = rng.standard_normal((3, 5, 7))
    flat = param.reshape(-1).copy()
    grad = rng.standard_normal((3, 5, 7))
    sgd_step(param, grad, lr=0.1)
    sgd_step(flat, grad.reshape(-1), lr=0.1)
    np.testing.assert_array_equal(param.reshape(-1), flat)


def test_float32_arithmetic_is_not_promoted_to_float64():
    """One float32 step must round like float32 arithmetic, not like float64 rounded once."""
    param = np.array([1.0], np.float32)
    grad = np.array([1e-8], np.float32)
    sgd_step(param, grad, lr=1.0)
    assert param[0] == np.float32(1.0), "float32 1 − 1e-8 must round back to 1"


# --- bad input: a clear error, and nothing written -------------------------------------


class _Host:
    """A DLPack producer in host memory that is not a NumPy array (like a CPU tensor)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return (1, 0)


def _sgd_arrays(dtype=np.float32, size=8):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(size).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: [a[0], a[1].astype(np.float64), a[2]], TypeError, "grad has dtype float64"),
        (lambda a: [a[0].astype(np.float16), a[1], a[2]], TypeError, "but param has float16"),
        (lambda a: [a[0].astype(np.int32), a[1], a[2]], TypeError, "expected float16, bfloat16"),
        (lambda a: [a[0], a[1][:4], a[2]], ValueError, "grad has shape"),
        (lambda a: [a[0], np.repeat(a[1], 2)[::2], a[2]], ValueError, "grad is not C-contiguous"),
        (lambda a: [a[0], a[1], a[0]], ValueError, "param and momentum_buffer overlap"),
        (lambda a: [a[0], a[1], None], ValueError, "momentum_buffer is required"),
        (lambda a: [a[0], list(a[1]), a[2]], TypeError, "grad must be a NumPy array"),
        (lambda a: [a[0], _Host(a[1]), a[2]], TypeError, r"pass np.from_dlpack\(grad\)"),
    ],
)
def test_sgd_step_rejects_bad_arrays_before_writing(change, error, message):
    arrays = change(_sgd_arrays())
    before = [None if a is None else np.array(a, copy=True) for a in arrays]
    with pytest.raises(error, match=message):
        sgd_step(*arrays, lr=0.1, momentum=0.9)
    for after, was in zip(arrays, before):
        if isinstance(after, np.ndarray):
            np.testing.assert_array_equal(after, was)


def test_read_only_param_is_rejected():
    param, grad, velocity = _sgd_arrays()
    param.flags.writeable = False
    with pytest.raises(ValueError, match="param is read-only"):
        sgd_step(param, grad, velocity, lr=0.1, momentum=0.9)
    grad.flags.writeable = False  # a read-only gradient is fine
    param.flags.writeable = True
    sgd_step(param, grad, velocity, lr=0.1, momentum=0.9)


def test_partially_overlapping_views_are_rejected():
    storage = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        sgd_step(storage[:8], np.ones(8, np.float32), storage[4:], lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -0.1}, "Invalid learning rate"),
        ({"lr": float("nan")}, "Invalid learning rate"),
        ({"lr": 0.1, "momentum": -0.5}, "Invalid momentum value"),
        ({"lr": 0.1, "weight_decay": -1.0}, "Invalid weight_decay value"),
        ({"lr": 0.1, "nesterov": True}, "Nesterov momentum requires"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov"),
        ({"lr": 0.1, "momentum": 0.9, "momentum_convention": "keras"}, "momentum_convention"),
    ],
)
def test_sgd_step_rejects_bad_hyperparameters_before_writing(options, message):
    arrays = _sgd_arrays()
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=message):
        sgd_step(*arrays, **options)
    for after, was in zip(arrays, before):
        np.testing.assert_array_equal(after, was)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"step": 1, "lr": -1.0}, "Invalid learning rate"),
        ({"step": 1, "eps": -1e-8}, "Invalid epsilon value"),
        ({"step": 1, "betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        ({"step": 1, "betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
        ({"step": 1, "weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"step": 0}, "Invalid step"),
        ({"step": 1.5}, "Invalid step"),
        ({"step": 1, "amsgrad": True}, "max_exp_avg_sq is required"),
    ],
)
def test_adam_step_rejects_bad_hyperparameters_before_writing(options, message):
    arrays = _sgd_arrays() + _sgd_arrays()[:1]
    arrays[3] = np.abs(arrays[3])
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=message):
        adam_step(*arrays, **options)
    for after, was in zip(arrays, before):
        np.testing.assert_array_equal(after, was)


def test_an_edit_to_any_file_a_kernel_is_made_of_changes_the_generated_file_names(tmp_path):
    """Numba keys its on-disk cache on a kernel's source file only: the generated loops'
    files are named after a digest of every file their code is made of (no digest kept
    by hand), so an edited rule, element step or conversion never meets an old kernel."""
    import shutil

    from fastmomentum.kernels import generated

    folder = Path(generated.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert generated.digest_of(copy) == generated.digest()
    for edited in ("rules/adam.py", "elements.py", "precision.py", "quantization.py"):
        path = copy / edited
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert generated.digest_of(copy) != generated.digest(), edited
        path.write_bytes(original)
    loop = cpu.loop(rules.adam.SPEC)
    assert Path(loop.__code__.co_filename).name.startswith("cpu_adam_")
    assert Path(loop.__code__.co_filename).read_text() == cpu.loop_source(rules.adam.SPEC)


def test_a_traceback_through_a_generated_loop_shows_its_generated_lines():
    """A generated loop is compiled under a file of its own, so a traceback (and pdb,
    and ``inspect.getsource``) shows the line that failed, not a line of cpu.py."""
    import inspect
    import traceback

    loop = cpu.loop(rules.sgd.PLAIN)
    assert inspect.getsource(loop) == cpu.loop_source(rules.sgd.PLAIN)
    with pytest.raises(TypeError) as raised:  # run as Python: the formats do not unpack
        loop(None, None, None, None, None, None)
    frame = traceback.extract_tb(raised.tb)[-1]
    assert frame.filename == loop.__code__.co_filename
    assert frame.line == "stored_param, stored_grad, stored_state, stored_companion = formats"


def test_with_no_writable_folder_generated_source_still_reaches_tracebacks(monkeypatch):
    """A read-only install and home: the source is registered with linecache, and Numba
    is told not to cache (test_packaging runs that install end to end)."""
    import linecache

    from fastmomentum.kernels import diskcache, generated

    monkeypatch.setattr(generated, "_folders", lambda: [])
    monkeypatch.setattr(diskcache, "warn_once", lambda: None)
    namespace = {}
    source = "def _probe(x):\n    return x + 1\n"
    assert generated.compile_into(namespace, "cpu", rules.sgd.PLAIN, source) is False
    filename = namespace["_probe"].__code__.co_filename
    assert filename.startswith("<fastmomentum generated cpu_sgd_plain_")
    assert linecache.getline(filename, 2) == "    return x + 1\n"


@pytest.mark.parametrize("spec", rules.SPECS, ids=[spec.name for spec in rules.SPECS])
def test_each_rule_takes_what_its_spec_says_in_order(spec):
    """The contract between a rule and its `specs.KernelSpec` (from which its loops, kernels
    and coefficients are made): ``rule(param, grad, *state, *coefficients, *entry,
    *flags, *entry_flags)``, held by this test, not a comment."""
    import inspect

    arguments = list(inspect.signature(spec.rule).parameters)
    fields = spec.coefficients._fields + (spec.entry._fields if spec.entry else ())
    state = len(spec.state)
    assert len(arguments) == 2 + state + len(fields) + len(spec.flags) + len(spec.entry_flags)
    assert tuple(arguments[2 + state : 2 + state + len(fields)]) == fields
    assert tuple(arguments[2 + state + len(fields) :]) == spec.flags + spec.entry_flags
    assert all(spec.optional_flag(name) in spec.flags for name, _ in spec.optional)


#: Rules with state and no 8-bit loops: Muon's passes, whose ``update`` (the Nesterov
#: update, then its orthogonalised form) is a scratch array no 8-bit codes could keep.
WITHOUT_8BIT_STATE = {"muon_momentum", "muon_apply"}


@pytest.mark.parametrize("spec", rules.SPECS, ids=[spec.name for spec in rules.SPECS])
def test_each_rule_with_state_declares_its_8bit_codes_and_its_loops_print(spec):
    """Every rule with state says how each state array is kept in 8 bits (signed codes
    for a moment of both signs, unsigned for a non-negative one), so its 8-bit loop
    and kernel are generated like the others, readable as source."""
    from fastmomentum.kernels import cpu, elements, specs

    cuda = pytest.importorskip("fastmomentum.kernels.cuda")
    if not spec.state or spec.name in WITHOUT_8BIT_STATE:
        assert spec.codes == ()
        with pytest.raises(ValueError, match="do not cover its state"):
            specs.int8_blockwise(spec)
        return
    signed = {"exp_avg", "momentum_buffer", "grad_avg"}
    assert dict(spec.codes) == {
        name: specs.SIGNED if name in signed else specs.UNSIGNED for name in spec.state
    }
    blockwise = specs.int8_blockwise(spec)
    assert specs.int8_blockwise(spec) is blockwise  # the launchers key on the object
    element = elements.element_source(blockwise)
    loops = [cpu.loop_source(blockwise), cuda.kernel_source(blockwise)]
    for source in (element, *loops):
        compile(source, blockwise.name, "exec")
    for name, kind in spec.codes:  # decoded in the element step, encoded by the loops
        assert f"decode_{kind}({name}[i], {name}_absmax)" in element
        encoded = re.compile(rf"{name}\[i\d*\] = encode_{kind}\(")  # CUDA: i0, i1, …
        assert all(bool(encoded.search(loop)) == (name in spec.written) for loop in loops)


def test_a_step_whose_codes_do_not_cover_its_state_has_no_8bit_loop():
    from fastmomentum.kernels import specs

    half = rules.adam.SPEC._replace(codes=rules.adam.SPEC.codes[:2])
    with pytest.raises(ValueError, match="do not cover its state"):
        specs.int8_blockwise(half)
    odd = rules.sgd.MOMENTUM._replace(codes=(("momentum_buffer", "int4"),))
    with pytest.raises(ValueError, match="'signed' or 'unsigned'"):
        specs.int8_blockwise(odd)


NADAM_CASES = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "momentum_decay": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", NADAM_CASES)
def test_nadam_step_matches_float64_reference(dtype, size, case):
    from fastmomentum.kernels import nadam_step

    rng = np.random.default_rng(size + 7)
    param = rng.standard_normal(size).astype(dtype)
    moments = [np.zeros(size, dtype), np.zeros(size, dtype)]
    expected = [param.astype(np.float64), np.zeros(size), np.zeros(size), 1.0]
    options = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
    options |= {"momentum_decay": 4e-3, **case}
    decoupled = options.pop("decoupled_weight_decay", False)
    mu_product = 1.0
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        mu_product = nadam_step(
            param, grad, *moments, step=step, mu_product=mu_product, lr=lr,
            decoupled_weight_decay=decoupled, **options,
        )  # fmt: skip
        expected = reference.nadam(
            expected[0], grad.astype(np.float64), *expected[1:3], expected[3], step=step,
            lr=lr, decoupled=decoupled, **options,
        )  # fmt: skip
    tolerance = RTOL[np.dtype(dtype).name]
    for name, actual, wanted in zip(
        ["param", "exp_avg", "exp_avg_sq"], [param, *moments], expected
    ):
        assert_relative_close(actual, wanted, tolerance, name)
    # the product is kept in the arrays' precision (float32 for float32, as torch keeps it)
    assert mu_product == pytest.approx(expected[3], rel=1e-6 if dtype == np.float32 else 1e-15)


RMSPROP_CASES = [
    {},
    {"weight_decay": 0.1, "maximize": True},
    {"centered": True},
    {"momentum": 0.9},
    {"momentum": 0.5, "centered": True, "alpha": 0.9, "eps": 1e-6},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", RMSPROP_CASES)
def test_rmsprop_step_matches_float64_reference(dtype, size, case):
    from fastmomentum.kernels import rmsprop_step

    rng = np.random.default_rng(size + 11)
    param = rng.standard_normal(size).astype(dtype)
    state = [np.zeros(size, dtype) for _ in range(3)]  # square_avg, buffer, grad_avg
    expected = [param.astype(np.float64)] + [np.zeros(size) for _ in range(3)]
    options = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}
    options |= {"centered": False, "maximize": False, **case}
    for step in range(STEPS):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        rmsprop_step(param, grad, *state, lr=lr, **options)
        expected = reference.rmsprop(
            expected[0], grad.astype(np.float64), *expected[1:], lr=lr, **options
        )
    tolerance = RTOL[np.dtype(dtype).name]
    names = ["param", "square_avg", "momentum_buffer", "grad_avg"]
    for name, actual, wanted in zip(names, [param, *state], expected):
        if (name == "momentum_buffer" and not options["momentum"]) or (
            name == "grad_avg" and not options["centered"]
        ):
            assert not actual.any(), f"{name} was written though unused"
            continue
        assert_relative_close(actual, wanted, tolerance, name)


ADAGRAD_CASES = [{}, {"weight_decay": 0.1, "lr_decay": 0.01}, {"maximize": True, "eps": 1e-6}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", ADAGRAD_CASES)
def test_adagrad_step_matches_float64_reference(dtype, size, case):
    from fastmomentum.kernels import adagrad_step

    rng = np.random.default_rng(size + 13)
    param = rng.standard_normal(size).astype(dtype)
    state_sum = np.full(size, 0.1, dtype)  # initial_accumulator_value
    expected = [param.astype(np.float64), state_sum.astype(np.float64)]
    options = {"lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10, "maximize": False, **case}
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        adagrad_step(param, grad, state_sum, step=step, lr=lr, **options)
        expected = reference.adagrad(
            *expected[:1], grad.astype(np.float64), expected[1], step=step, lr=lr, **options
        )
    tolerance = RTOL[np.dtype(dtype).name]
    assert_relative_close(param, expected[0], tolerance, "param")
    assert_relative_close(state_sum, expected[1], tolerance, "sum")
