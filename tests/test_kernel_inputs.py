"""What the low-level API accepts, and what no step may raise on.

- Arrays: a kernel sees an array's first address and its length only, so it must get a
  plain, contiguous, aligned, writeable NumPy array of exactly its elements, apart from
  every other argument. Anything else is refused with an error naming the argument, and
  the memory around the arrays is compared bit for bit afterwards.
- Values: a division by zero or a square root of a negative number gives IEEE's
  ±inf/NaN where ``torch.optim`` gives them, in the serial loop (short arrays), the
  threaded loop and the CUDA kernels alike, and never a Python exception half-way.
- Argument types: a hyperparameter of the wrong type raises ``TypeError`` naming it, an
  invalid value ``ValueError``, before anything is written.
"""

import numpy as np
import pytest
import torch

from fastmomentum.kernels import adam_step, adamw_step, config, sgd_step
from fastmomentum.kernels.arrays import flat_views

from . import reference
from .assertions import RTOL, assert_relative_close

SGD_NAMES = ("param", "grad", "momentum_buffer")
ADAM_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SGD_OPTIONS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
ADAM_OPTIONS = {"step": 3, "lr": 0.01, "weight_decay": 0.01, "amsgrad": True}


def sgd(*arrays):
    sgd_step(*arrays, **SGD_OPTIONS)


def adam(*arrays):
    adam_step(*arrays, **ADAM_OPTIONS)


def expected_after(call, arrays):
    """The float64 reference of ``call`` (`sgd` or `adam`) on copies of ``arrays``."""
    values = [np.array(array, dtype=np.float64).reshape(-1) for array in arrays]
    if call is sgd:
        options = {"dampening": 0.0, "nesterov": False, "maximize": False, "first_step": False}
        return reference.sgd(*values, **SGD_OPTIONS, **options)
    param, grad, *state = values
    options = {"betas": (0.9, 0.999), "eps": 1e-8, "maximize": False, "decoupled": False}
    return reference.adam(param, grad, *state, **ADAM_OPTIONS, **options)


CALLS = [(sgd, name) for name in SGD_NAMES] + [(adam, name) for name in ADAM_NAMES]
CALL_IDS = [f"{call.__name__}-{name}" for call, name in CALLS]


def names_of(call):
    return SGD_NAMES if call is sgd else ADAM_NAMES


def assert_stepped(call, arrays, expected):
    """The arrays ``call`` writes (all but grad) against its reference ``expected``."""
    written = [(n, a) for n, a in zip(names_of(call), arrays) if n != "grad"]
    for (name, actual), wanted in zip(written, expected):
        assert_relative_close(actual.reshape(-1), wanted, RTOL["float32"], name)


def views_into(storage, count, shape):
    """``count`` disjoint views of ``shape`` into ``storage``, with gaps around each."""
    size = int(np.prod(shape))
    return [
        storage[8 + k * (size + 8) : 8 + k * (size + 8) + size].reshape(shape) for k in range(count)
    ]


def random_storage(count, size, seed=0):
    """Random float32 memory for ``count`` arrays of ``size`` elements and gaps of 8;
    positive, so that it can hold second moments."""
    rng = np.random.default_rng(seed)
    return (rng.random(8 + count * (size + 8)) + 0.5).astype(np.float32)


# --- arrays --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize(("call", "odd"), CALLS, ids=CALL_IDS)
def test_a_matrix_is_refused_and_the_memory_around_it_stays_bit_identical(call, odd):
    """np.matrix stays 2-D when reshaped; refused, nothing written anywhere in storage.
    Its plain view (np.asarray) is stepped, and only its own elements change."""
    names = names_of(call)
    storage = random_storage(len(names), 16)
    before = storage.copy()
    arrays = views_into(storage, len(names), (4, 4))
    position = names.index(odd)
    with_matrix = [np.asmatrix(a) if k == position else a for k, a in enumerate(arrays)]
    with pytest.raises(TypeError, match=f"{odd} is a numpy.matrix, a subclass of np.ndarray"):
        call(*with_matrix)
    assert storage.tobytes() == before.tobytes()

    expected = expected_after(call, arrays)
    call(*[np.asarray(a) for a in with_matrix])
    gaps = np.ones(storage.size, bool)
    for array in arrays:
        start = (array.ctypes.data - storage.ctypes.data) // storage.itemsize
        gaps[start : start + array.size] = False
    assert storage[gaps].tobytes() == before[gaps].tobytes(), "memory between the arrays changed"
    assert_stepped(call, arrays, expected)


@pytest.mark.parametrize(("call", "odd"), CALLS, ids=CALL_IDS)
def test_masked_arrays_and_other_subclasses_are_refused(call, odd):
    class Tagged(np.ndarray):
        pass

    names = names_of(call)
    storage = random_storage(len(names), 16)
    before = storage.copy()
    arrays = views_into(storage, len(names), (16,))
    position = names.index(odd)
    masked = np.ma.masked_array(arrays[position], mask=np.arange(16) % 3 == 0)
    with pytest.raises(TypeError, match=rf"{odd} is a masked array .*np.asarray\({odd}\)"):
        call(*arrays[:position], masked, *arrays[position + 1 :])
    tagged = arrays[position].view(Tagged)
    with pytest.raises(TypeError, match=f"{odd} is a .*Tagged, a subclass of np.ndarray"):
        call(*arrays[:position], tagged, *arrays[position + 1 :])
    assert storage.tobytes() == before.tobytes()


def test_a_memmap_is_stepped_in_place(tmp_path):
    arrays = [a.copy() for a in views_into(random_storage(3, 101), 3, (101,))]
    expected = expected_after(sgd, arrays)
    param = np.memmap(tmp_path / "param.bin", np.float32, "w+", shape=(101,))
    param[:] = arrays[0]
    sgd(param, arrays[1], arrays[2])
    param.flush()
    stored = np.fromfile(tmp_path / "param.bin", np.float32)
    assert_relative_close(stored, expected[0], RTOL["float32"], "param")


@pytest.mark.parametrize("call", [sgd, adam])
def test_zero_dimensional_arrays_are_stepped_like_one_element_arrays(call):
    values = views_into(random_storage(len(names_of(call)), 1), len(names_of(call)), ())
    scalars = [np.array(v) for v in values]
    assert all(s.ndim == 0 for s in scalars)
    expected = expected_after(call, scalars)
    call(*scalars)
    assert_stepped(call, scalars, expected)


def test_what_reaches_a_kernel_is_a_plain_1d_view_of_exactly_the_elements(tmp_path):
    memmap = np.memmap(tmp_path / "memmap.bin", np.float32, "w+", shape=(3, 4))
    accepted = {"2-D": np.ones((3, 4), np.float32), "0-D": np.array(1.0), "memmap": memmap}
    for kind, array in accepted.items():
        (view,) = flat_views({"param": array})
        assert view.ndim == 1 and view.size == array.size, kind
        assert view.ctypes.data == array.ctypes.data and view.dtype == array.dtype, kind


NON_CONTIGUOUS = {
    "strided": lambda storage: storage[: 2 * 16 : 2],
    "reversed": lambda storage: storage[15::-1],
    "columns": lambda storage: storage[:32].reshape(4, 8)[:, :4],
}


@pytest.mark.parametrize("layout", list(NON_CONTIGUOUS))
@pytest.mark.parametrize(("call", "odd"), CALLS, ids=CALL_IDS)
def test_non_contiguous_views_are_refused(call, odd, layout):
    """The kernels step contiguous memory: a strided view would have its gaps written."""
    names = names_of(call)
    storage = random_storage(len(names) + 1, 32)
    before = storage.copy()
    odd_view = NON_CONTIGUOUS[layout](storage[-40:])
    arrays = [a.reshape(odd_view.shape) for a in views_into(storage, len(names), (16,))]
    arrays[names.index(odd)] = odd_view
    with pytest.raises(ValueError, match=f"{odd} is not C-contiguous"):
        call(*arrays)
    assert storage.tobytes() == before.tobytes()


def test_fortran_ordered_arrays_are_refused_and_their_transposes_stepped():
    rng = np.random.default_rng(5)
    arrays = [np.asfortranarray(rng.random((5, 7), np.float32) + 0.5) for _ in SGD_NAMES]
    before = [a.copy() for a in arrays]
    with pytest.raises(
        ValueError, match=r"param is not C-contiguous but Fortran-ordered.*param\.T"
    ):
        sgd(*arrays)
    for array, was in zip(arrays, before):
        np.testing.assert_array_equal(array, was)
    transposes = [a.T for a in arrays]
    expected = expected_after(sgd, transposes)
    sgd(*transposes)
    assert_stepped(sgd, transposes, expected)


@pytest.mark.parametrize(
    ("call", "odd"),
    [case for case in CALLS if case[1] != "grad"],
    ids=[i for i in CALL_IDS if not i.endswith("-grad")],
)
def test_read_only_arrays_that_a_step_writes_are_refused(call, odd):
    names = names_of(call)
    storage = random_storage(len(names), 16)
    before = storage.copy()
    arrays = views_into(storage, len(names), (16,))
    arrays[names.index(odd)].flags.writeable = False
    with pytest.raises(ValueError, match=f"{odd} is read-only but is updated in place"):
        call(*arrays)
    assert storage.tobytes() == before.tobytes()


@pytest.mark.parametrize("odd", SGD_NAMES)
def test_misaligned_arrays_are_refused(odd):
    """A float32 array starting one byte past an element boundary: loads through a typed
    pointer assume the dtype's alignment."""
    rng = np.random.default_rng(6)
    memory = bytearray((rng.random(17, np.float32) + 0.5).tobytes())
    before = bytes(memory)
    misaligned = np.frombuffer(memory, np.float32, count=16, offset=1)
    assert not misaligned.flags.aligned and misaligned.flags.writeable
    arrays = [rng.random(16, np.float32) + 0.5 for _ in SGD_NAMES]
    arrays[SGD_NAMES.index(odd)] = misaligned
    with pytest.raises(ValueError, match=f"{odd} is not aligned to its float32 elements"):
        sgd(*arrays)
    assert bytes(memory) == before


def test_byte_swapped_arrays_are_refused():
    param, grad, buffer = (np.ones(4, np.float32) for _ in SGD_NAMES)
    with pytest.raises(TypeError, match="param has dtype >f4"):
        sgd(param.astype(">f4"), grad, buffer)


@pytest.mark.parametrize(
    ("call", "pair"),
    [
        (sgd, ("param", "grad")),
        (sgd, ("grad", "momentum_buffer")),
        (adam, ("exp_avg", "exp_avg_sq")),
    ],
)
def test_arguments_sharing_memory_are_refused(call, pair):
    """Refused even where an element-by-element step would be well defined (param and
    grad the very same array): one rule, every argument its own memory."""
    names = names_of(call)
    storage = random_storage(len(names), 16)
    before = storage.copy()
    arrays = views_into(storage, len(names), (16,))
    arrays[names.index(pair[1])] = arrays[names.index(pair[0])]
    with pytest.raises(ValueError, match=f"{pair[0]} and {pair[1]} overlap in memory"):
        call(*arrays)
    assert storage.tobytes() == before.tobytes()


# --- values: IEEE results as torch's, in every loop -----------------------------------

SERIAL, THREADED = 1001, 20011  # below and above config.CPU_SERIAL_BELOW
ZERO_EPS_CASES = {
    "adam": ("Adam", {"eps": 0.0}),
    "adam-amsgrad": ("Adam", {"eps": 0.0, "amsgrad": True}),
    "adamw-maximize": ("AdamW", {"eps": 0.0, "maximize": True}),  # decoupled decay 0.01
    "adam-eps-below-float32": ("Adam", {"eps": 1e-50}),  # rounds to 0 in float32
}


def torch_steps(name, param, grads, state=None, **options):
    """``torch.optim.<name>`` (for-loop implementation) over ``grads``; returns the
    parameter and its state as NumPy arrays (``state``: initial values, step included)."""
    tensor = torch.nn.Parameter(torch.from_numpy(param.copy()))
    optimizer = getattr(torch.optim, name)([tensor], lr=0.01, foreach=False, **options)
    if state is not None:
        optimizer.state[tensor] = {k: torch.as_tensor(np.copy(v)) for k, v in state.items()}
    for grad in grads:
        tensor.grad = torch.from_numpy(grad.copy())
        optimizer.step()
    final = optimizer.state[tensor]
    return tensor.detach().numpy(), {k: v.numpy() for k, v in final.items() if k != "step"}


def our_steps(name, param, grads, state=None, **options):
    """`adam_step`/`adamw_step` from ``state`` (zeros by default) over ``grads``; the same
    return value as `torch_steps`."""
    param = param.copy()
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if options.get("amsgrad") else [])
    if state is None:
        state = {"step": 0.0, **{key: np.zeros_like(param) for key in keys}}
    moments = {key: np.array(state[key], copy=True) for key in keys}
    step = adam_step if name == "Adam" else adamw_step
    for count, grad in enumerate(grads, start=int(state["step"]) + 1):
        step(param, grad, *moments.values(), step=count, lr=0.01, **options)
    return param, moments


def assert_same_as_torch(ours, theirs):
    (param, moments), (expected_param, expected_moments) = ours, theirs
    assert_relative_close(param, expected_param, RTOL["float32"], "param")
    for key, value in expected_moments.items():
        assert_relative_close(moments[key], value, RTOL["float32"], key)


def gradients_with_zeros(size, steps, seed):
    """Random float32 gradients with exact zeros at fixed places (0/0 with eps = 0:
    NaN) and 1e-30 at others (its square underflows to 0: m/0 = ±inf)."""
    rng = np.random.default_rng(seed)
    zeros, tiny = np.arange(3, size, 97), np.arange(50, size, 97)  # disjoint
    grads = []
    for _ in range(steps):
        grad = rng.standard_normal(size).astype(np.float32)
        grad[zeros], grad[tiny] = 0.0, 1e-30
        grads.append(grad)
    return grads, zeros, tiny


@pytest.mark.parametrize("size", [SERIAL, THREADED], ids=["serial", "threaded"])
@pytest.mark.parametrize("case", list(ZERO_EPS_CASES))
def test_zero_eps_and_zero_gradients_give_torch_nan_in_both_cpu_loops(case, size):
    """Was: the serial loop raised ZeroDivisionError half-way through the array."""
    assert SERIAL < config.CPU_SERIAL_BELOW <= THREADED
    name, options = ZERO_EPS_CASES[case]
    rng = np.random.default_rng(size)
    param = rng.standard_normal(size).astype(np.float32)
    grads, zeros, tiny = gradients_with_zeros(size, 3, seed=size + 1)
    ours = our_steps(name, param, grads, **options)
    assert_same_as_torch(ours, torch_steps(name, param, grads, **options))
    assert np.isnan(ours[0][zeros]).all() and not np.isfinite(ours[0][tiny]).any()


@pytest.mark.parametrize("size", [SERIAL, THREADED], ids=["serial", "threaded"])
@pytest.mark.parametrize(
    ("name", "options"), [("Adam", {"amsgrad": True, "weight_decay": 0.1}), ("AdamW", {})]
)
def test_non_finite_gradients_and_negative_state_give_torch_results(name, options, size):
    """±inf and NaN gradients, and a loaded second moment below zero (√ of a negative
    number: NaN), from a step-4 state: the values torch gives, nothing raised."""
    rng = np.random.default_rng(size + 2)
    param = rng.standard_normal(size).astype(np.float32)
    state = {"step": np.float32(4.0)}
    state["exp_avg"] = rng.standard_normal(size).astype(np.float32) * 0.1
    state["exp_avg_sq"] = rng.random(size, np.float32) * 0.01 + 1e-3
    state["exp_avg_sq"][7::101] *= -100.0  # stays negative after β2·v + (1 − β2)·g²
    if options.get("amsgrad"):
        state["max_exp_avg_sq"] = state["exp_avg_sq"] * 1.5
    grads, _, _ = gradients_with_zeros(size, 2, seed=size + 3)
    for grad, bad in zip(grads, (np.inf, np.nan)):
        grad[11::103], grad[13::107] = bad, -np.inf
    ours = our_steps(name, param, grads, state, **options)
    assert_same_as_torch(ours, torch_steps(name, param, grads, state, **options))
    assert np.isnan(ours[0][7::101]).all()


@pytest.fixture
def cuda(monkeypatch):
    """numba.cuda (the simulator here), with launches small enough for several blocks."""
    module = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    return module


@pytest.mark.cudasim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars warn
@pytest.mark.parametrize("case", ["adam-amsgrad", "adam-eps-below-float32"])
def test_zero_eps_on_the_cuda_kernels_gives_torch_nan(cuda, case):
    name, options = ZERO_EPS_CASES[case]
    size = 37
    param = np.random.default_rng(8).standard_normal(size).astype(np.float32)
    grads, zeros, _ = gradients_with_zeros(size, 2, seed=9)
    device_param = cuda.to_device(param)
    count = 3 if options.get("amsgrad") else 2
    moments = [cuda.to_device(np.zeros(size, np.float32)) for _ in range(count)]
    for step, grad in enumerate(grads, start=1):
        adam_step(device_param, cuda.to_device(grad), *moments, step=step, lr=0.01, **options)
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"][:count]
    ours = device_param.copy_to_host(), {k: m.copy_to_host() for k, m in zip(keys, moments)}
    assert_same_as_torch(ours, torch_steps(name, param, grads, **options))
    assert np.isnan(ours[0][zeros]).all()


# --- argument types -----------------------------------------------------------------

SGD_ARGUMENTS = [
    ({"lr": "0.1"}, TypeError, "lr must be a real number, got str"),
    ({"lr": True}, TypeError, "lr must be a real number, got bool"),
    ({"lr": 0.1, "momentum": None}, TypeError, "momentum must be a real number, got NoneType"),
    ({"lr": 0.1, "momentum": 0.9, "dampening": [0.1]}, TypeError, "dampening must be .* list"),
    ({"lr": 0.1, "weight_decay": np.array([0.1])}, TypeError, "weight_decay must be .* ndarray"),
    ({"lr": 0.1, "momentum": 0.9, "nesterov": "True"}, TypeError, "nesterov must be a bool"),
    ({"lr": 0.1, "maximize": 1}, TypeError, "maximize must be a bool, got int"),
    ({"lr": 0.1, "momentum": 0.9, "first_step": None}, TypeError, "first_step must be a bool"),
    ({"lr": 0.1, "momentum": 0.9, "momentum_convention": None}, ValueError, "momentum_conv"),
    ({"lr": 0.1, "momentum": float("nan")}, ValueError, "Invalid momentum value: nan"),
    ({"lr": 0.1, "momentum": 0.9, "dampening": np.inf}, ValueError, "Invalid dampening value"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
]
ADAM_ARGUMENTS = [
    ({"lr": "1e-3"}, TypeError, "lr must be a real number, got str"),
    ({"eps": "1e-8"}, TypeError, "eps must be a real number, got str"),
    ({"weight_decay": None}, TypeError, "weight_decay must be a real number, got NoneType"),
    ({"betas": 0.9}, TypeError, "betas must be a pair of real numbers, got float"),
    ({"betas": ("0.9", 0.999)}, TypeError, r"betas\[0\] must be a real number, got str"),
    ({"betas": (0.9,)}, ValueError, "betas must be a pair"),
    ({"betas": (0.9, float("nan"))}, ValueError, "Invalid beta parameter at index 1: nan"),
    ({"eps": float("nan")}, ValueError, "Invalid epsilon value: nan"),
    ({"weight_decay": float("nan")}, ValueError, "Invalid weight_decay value: nan"),
    ({"step": "1"}, TypeError, "step must be a real number, got str"),
    ({"step": True}, TypeError, "step must be a real number, got bool"),
    ({"step": float("inf")}, ValueError, "Invalid step: inf"),
    ({"amsgrad": "yes"}, TypeError, "amsgrad must be a bool, got str"),
    ({"maximize": None}, TypeError, "maximize must be a bool, got NoneType"),
    ({"decoupled_weight_decay": 1}, TypeError, "decoupled_weight_decay must be a bool"),
]  # adamw_step's decoupled_weight_decay: ADAMW_ARGUMENTS
ADAMW_ARGUMENTS = [
    (
        {"decoupled_weight_decay": False},
        TypeError,
        r"adamw_step always decouples .* adam_step\(\.\.\., decoupled_weight_decay=False\)",
    ),
    ({"lr": "0.1"}, TypeError, "lr must be a real number, got str"),
    ({"amsgrad": 0}, TypeError, "amsgrad must be a bool, got int"),
]


def checked_call(function, options, error, message, arrays):
    storage_before = [a.copy() for a in arrays]
    with pytest.raises(error, match=message):
        function(*arrays, **options)
    for array, was in zip(arrays, storage_before):
        np.testing.assert_array_equal(array, was)


@pytest.mark.parametrize(("options", "error", "message"), SGD_ARGUMENTS)
def test_sgd_step_names_a_bad_argument_before_writing(options, error, message):
    arrays = views_into(random_storage(3, 9), 3, (9,))
    checked_call(sgd_step, options, error, message, arrays)


@pytest.mark.parametrize(
    ("function", "options", "error", "message"),
    [(adam_step, *case) for case in ADAM_ARGUMENTS]
    + [(adamw_step, *case) for case in ADAM_ARGUMENTS if "decoupled" not in case[0]],
)
def test_adam_steps_name_a_bad_argument_before_writing(function, options, error, message):
    arrays = views_into(random_storage(5, 9), 5, (9,))
    checked_call(function, {"step": 1, "amsgrad": True, **options}, error, message, arrays)


@pytest.mark.parametrize(("options", "error", "message"), ADAMW_ARGUMENTS)
def test_adamw_step_names_a_bad_argument_before_writing(options, error, message):
    arrays = views_into(random_storage(5, 9), 5, (9,))
    checked_call(adamw_step, {"step": 1, **options}, error, message, arrays)


def test_numpy_scalars_and_ints_are_taken_as_their_values():
    """NumPy and integer hyperparameters and np.bool_ flags step exactly as floats and
    bools do."""
    with_numpy = [a.copy() for a in views_into(random_storage(5, 33), 5, (33,))]
    with_python = [a.copy() for a in with_numpy]
    sgd_step(*with_numpy[:3], lr=np.float32(0.5), momentum=np.float64(0.75), nesterov=np.True_,
             first_step=np.bool_(True), weight_decay=0)  # fmt: skip
    sgd_step(*with_python[:3], lr=float(np.float32(0.5)), momentum=0.75, nesterov=True,
             first_step=True, weight_decay=0.0)  # fmt: skip
    adamw_step(*with_numpy[:4], step=np.int64(2), lr=1, betas=[np.float32(0.5), 0.75])
    adamw_step(*with_python[:4], step=2.0, lr=1.0, betas=(0.5, 0.75))
    for a, b in zip(with_numpy, with_python):
        np.testing.assert_array_equal(a, b)


@pytest.mark.cudasim
def test_a_stream_of_the_wrong_type_is_named_before_writing(cuda):
    param = cuda.to_device(np.full(9, 1.5, np.float32))
    grad = cuda.to_device(np.full(9, 0.5, np.float32))
    with pytest.raises(TypeError, match="stream must be a Numba stream, .* got str"):
        sgd_step(param, grad, lr=0.1, stream="0")
    np.testing.assert_array_equal(param.copy_to_host(), np.full(9, 1.5, np.float32))
