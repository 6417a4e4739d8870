"""bfloat16 and float16 parameters, computed in float32 with one rounding per stored value.

The conversions are checked against torch's own on every 16-bit pattern and on float32
values of every magnitude. Adam and AdamW on bfloat16/float16 parameters are
bit-identical to ``torch.optim.Adam(..., fused=True)`` on the CPU (its AVX2/AVX-512
kernels: float32 arithmetic, three multiply-adds rounded once, `rules.adam.fused_update`)
except in each tensor's last ``numel mod 16`` elements, whose exp_avg_sq torch computes
in a scalar loop; tests/test_precision_rate.py measures both on 2²⁰ elements.
torch 2.13's fused CPU SGD is no reference for these dtypes: in its vectorised body
it leaves bfloat16 and float16 parameters unchanged (seen here: a 100-element
bfloat16 parameter with lr 0.1 does not move; pytorch #191763, fixed by #192545 after
2.13). SGD is therefore checked bit for bit
against a float32 computation rounded once per stored value, and against torch's
for-loop step within one unit in the last place.
"""

import numpy as np
import pytest
import torch
from numba import njit

import fastmomentum
from fastmomentum.kernels import config, precision
from fastmomentum.kernels.precision import load, store

from .sixteen_bits import FORMATS, IDS, needs_vector_kernels


@njit(cache=True)
def _decode(bits, out):
    for i in range(bits.size):
        out[i] = load(bits, i, np.float32(0))


@njit(cache=True)
def _encode(values, out):
    for i in range(values.size):
        store(out, i, values[i])


def _awkward_float32s():
    """Normal values of every magnitude, random bit patterns (NaN, inf, subnormals) and
    the edges: float16's largest, its rounding to inf, its smallest subnormal and ties."""
    rng = np.random.default_rng(0)
    scaled = rng.standard_normal(50_000) * 10.0 ** rng.integers(-12, 6, 50_000)
    random_bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    edges = [0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2**-24, 2**-25, 3 * 2**-26]
    edges += [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 3.4e38, 1.1754944e-38]
    return np.concatenate(
        [scaled.astype(np.float32), random_bits.view(np.float32), np.array(edges, np.float32)]
    )


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
def test_every_16_bit_pattern_reads_as_torch_reads_it(dtype, carrier):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(carrier)
    expected = torch.from_numpy(bits.view(np.int16).copy()).view(dtype).float().numpy()
    compiled = np.empty(bits.size, np.float32)
    _decode(bits, compiled)
    python = np.array([load(bits, i, np.float32(0)) for i in range(0, bits.size, 7)])
    for actual, wanted in ((compiled, expected), (python, expected[::7])):
        nan = np.isnan(wanted)
        assert np.array_equal(np.isnan(actual), nan)
        assert np.array_equal(actual[~nan].view(np.uint32), wanted[~nan].view(np.uint32))


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
def test_float32_values_round_as_torch_rounds_them(dtype, carrier):
    values = _awkward_float32s()
    expected = torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(carrier)
    compiled = np.zeros(values.size, carrier)
    _encode(values, compiled)
    python = np.zeros(values.size // 11 + 1, carrier)
    for position, i in enumerate(range(0, values.size, 11)):
        store(python, position, values[i])
    nan = np.isnan(values)
    for actual, wanted, keep in (
        (compiled, expected, ~nan),
        (python, expected[::11], ~nan[::11]),
    ):
        assert np.array_equal(actual[keep], wanted[keep])
        back = torch.from_numpy(actual.view(np.int16).copy()).view(dtype).float().numpy()
        assert np.isnan(back[~keep]).all()  # NaN stays NaN


@njit(cache=True)
def _float16_on_gpu(bits, values, read, rounded):
    for i in range(bits.size):
        read[i] = precision._float16_to_float32_on_gpu(bits[i])
    for i in range(values.size):
        rounded[i] = precision._float32_to_float16_on_gpu(values[i])


def test_the_gpus_float16_conversions_round_as_torch_and_keep_nan_bits():
    """The CUDA kernels' float16 conversions, compiled here from the same LLVM IR (LLVM's
    ``fpext``/``fptrunc``, a GPU's ``cvt``, x86's F16C): torch's values, and for NaN the
    bits the CPU loops give (sign and payload kept, a stored NaN quiet)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    values = _awkward_float32s()
    read, rounded = np.empty(bits.size, np.float32), np.empty(values.size, np.int16)
    _float16_on_gpu(bits, values, read, rounded)
    expected = torch.from_numpy(bits.copy()).view(torch.float16).float().numpy()
    nan = np.isnan(expected)
    assert np.array_equal(read[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    half = bits[nan].view(np.uint16).astype(np.uint32)
    kept = ((half & 0x8000) << 16) | 0x7F800000 | ((half & 0x3FF) << 13)
    assert np.array_equal(read[nan].view(np.uint32), kept)
    expected = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy()
    nan = np.isnan(values)
    assert np.array_equal(rounded[~nan], expected[~nan])
    word = values[nan].view(np.uint32)
    quiet = ((word >> 16) & 0x8000) | 0x7E00 | ((word & 0x7FFFFF) >> 13)
    assert np.array_equal(rounded[nan].view(np.uint16), quiet.astype(np.uint16))
    cpu = np.zeros(values.size, np.int16)
    _encode(values, cpu)
    assert np.array_equal(cpu, rounded)  # the CPU loops' bits, NaN included


def _twins(dtype, library, name, options, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (33,), (5, 3, 3, 3), (1,)]  # > one vector, odd tails, a scalar
    params = [
        torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes
    ]
    return params, getattr(library, name)(params, **options)


def _step_both(ours, theirs, steps, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(ours[0], theirs[0]):
            grad = torch.randn(p.shape, generator=generator).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours[1].step()
        theirs[1].step()


ADAMS = [
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("AdamW", {"lr": 1e-2}),
    ("AdamW", {"lr": 1e-2, "betas": (0.8, 0.99)}),
]


@needs_vector_kernels
@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize(
    ("name", "options"), ADAMS, ids=["adam", "amsgrad", "adamw", "adamw-beta1-0.8"]
)
def test_adam_on_16_bit_params_is_bit_identical_to_torch_fused(name, options, dtype, carrier):
    """Bit-identical after 20 steps, odd sizes and a scalar included (each tensor's last
    ``numel mod 16`` elements, which torch steps in a scalar loop, may differ in
    exp_avg_sq: tests/test_precision_rate.py bounds that; these seeds show none). Too few
    elements to show a rate: tests/test_precision_rate.py steps 2²⁰."""
    ours = _twins(dtype, fastmomentum, name, options)
    theirs = _twins(dtype, torch.optim, name, {**options, "fused": True})
    _step_both(ours, theirs, 20, dtype)
    for p, q in zip(ours[0], theirs[0]):
        assert p.dtype == dtype
        assert torch.equal(p, q)
        for key, value in theirs[1].state[q].items():
            assert ours[1].state[p][key].dtype == value.dtype
            assert torch.equal(ours[1].state[p][key], value), key


def _sgd_reference(param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's step in float32, each stored value rounded once to its dtype."""
    dtype, f = param.dtype, lambda t: t.float()
    direction = f(grad) + weight_decay * f(param) if weight_decay else f(grad)
    if momentum:
        if buffer is None:
            velocity = direction
        else:
            velocity = momentum * f(buffer) + (1 - dampening) * direction
        update = direction + momentum * velocity if nesterov else velocity
        buffer = velocity.to(dtype)
    else:
        update = direction
    return (f(param) - lr * update).to(dtype), buffer


SGDS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True},
]


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize("options", SGDS, ids=["plain", "momentum", "nesterov"])
def test_sgd_on_16_bit_params_rounds_once_per_stored_value(options, dtype, carrier):
    params, optimizer = _twins(dtype, fastmomentum, "SGD", options)
    settings = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, **options}
    expected = [p.detach().clone() for p in params]
    buffers = [None] * len(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        for index, param in enumerate(params):
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
            expected[index], buffers[index] = _sgd_reference(
                expected[index], param.grad, buffers[index], **settings
            )
        optimizer.step()
    for index, param in enumerate(params):
        assert torch.equal(param.detach(), expected[index])
        if options.get("momentum"):
            assert torch.equal(optimizer.state[param]["momentum_buffer"], buffers[index])


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize("options", SGDS, ids=["plain", "momentum", "nesterov"])
def test_one_sgd_step_is_within_one_ulp_of_torchs_loop(options, dtype, carrier):
    """torch's loop rounds some intermediate values too (and fuses multiply-adds)."""
    ours = _twins(dtype, fastmomentum, "SGD", options)
    theirs = _twins(dtype, torch.optim, "SGD", {**options, "foreach": False})
    _step_both(ours, theirs, 1, dtype)
    for p, q in zip(ours[0], theirs[0]):
        ulp = torch.finfo(dtype).eps * q.detach().float().abs().clamp_min(1.0)
        assert ((p.detach().float() - q.detach().float()).abs() <= ulp).all()


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
def test_a_16_bit_run_resumes_bit_identically_from_its_checkpoint(dtype, carrier):
    name, options = ADAMS[0]
    unbroken = _twins(dtype, fastmomentum, name, options)
    first = _twins(dtype, fastmomentum, name, options)
    _step_both(unbroken, first, 5, dtype)
    checkpoint = first[1].state_dict()
    assert checkpoint["state"][0]["exp_avg"].dtype == dtype
    resumed = _twins(dtype, fastmomentum, name, options)
    with torch.no_grad():
        for p, q in zip(resumed[0], first[0]):
            p.copy_(q)
    resumed[1].load_state_dict(checkpoint)
    _step_both(unbroken, resumed, 5, dtype, seed=7)
    for p, q in zip(unbroken[0], resumed[0]):
        assert torch.equal(p, q)


@pytest.mark.cudasim
@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize(("name", "options"), [ADAMS[1], ("SGD", SGDS[2])], ids=["adam", "sgd"])
def test_the_cuda_kernels_step_16_bit_params_as_the_cpu_kernels(
    name, options, dtype, carrier, monkeypatch
):
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=generator).to(dtype) for shape in [(7, 5), (3,)]]
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        params = [v.clone().requires_grad_() for v in values]
        optimizer = getattr(fastmomentum, name)(params, **options)
        grads = torch.Generator().manual_seed(1)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, generator=grads).to(dtype)
            optimizer.step()
        results.append(params)
    for cpu, cuda in zip(*results):
        assert torch.equal(cpu, cuda)


# --- the low-level API on bfloat16 arrays (ml_dtypes) and bfloat16 state arrays ------------


def _bfloat16_numpy(tensor):
    """A torch bfloat16 tensor as an ml_dtypes bfloat16 NumPy array (same bits)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return tensor.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)


def _as_torch(array):
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)


@needs_vector_kernels
def test_low_level_steps_on_bfloat16_arrays_are_bit_identical_to_torch_fused_adam():
    from fastmomentum.kernels import adam_step

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=generator).bfloat16()
    param = start.clone().requires_grad_()
    theirs = torch.optim.Adam([param], lr=1e-2, fused=True)
    arrays = [_bfloat16_numpy(start)]
    arrays += [_bfloat16_numpy(torch.zeros(1000).bfloat16()) for _ in range(2)]
    for step in range(1, 6):
        grad = torch.randn(1000, generator=generator).bfloat16()
        param.grad = grad.clone()
        theirs.step()
        adam_step(arrays[0], _bfloat16_numpy(grad), arrays[1], arrays[2], step=step, lr=1e-2)
    assert torch.equal(_as_torch(arrays[0]), param.detach())
    assert torch.equal(_as_torch(arrays[1]), theirs.state[param]["exp_avg"])


def test_low_level_bfloat16_state_arrays_step_as_the_torch_option():
    """float32 params and gradients with bfloat16 moments: ``state_dtype=torch.bfloat16``."""
    from fastmomentum.kernels import adam_step

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=generator)
    param = start.clone().requires_grad_()
    ours = fastmomentum.Adam([param], lr=1e-2, state_dtype=torch.bfloat16)
    params = start.numpy().copy()
    moments = [_bfloat16_numpy(torch.zeros(1000).bfloat16()) for _ in range(2)]
    for step in range(1, 6):
        grad = torch.randn(1000, generator=generator)
        param.grad = grad.clone()
        ours.step()
        adam_step(params, grad.numpy(), *moments, step=step, lr=1e-2)
    assert np.array_equal(params, param.detach().numpy())
    assert torch.equal(_as_torch(moments[1]), ours.state[param]["exp_avg_sq"])


@pytest.mark.parametrize(
    ("param", "state", "message"),
    [
        (np.float32, np.float16, "exp_avg has dtype float16 but param has float32"),
        (np.float64, "bfloat16", "exp_avg has dtype bfloat16 but param has float64"),
        (np.float32, "mixed", "exp_avg_sq has dtype float32 but exp_avg has bfloat16"),
    ],
)
def test_low_level_dtype_combinations_we_cannot_step_are_refused_untouched(param, state, message):
    from fastmomentum.kernels import adam_step

    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    params, grads = (rng.standard_normal(16).astype(param) for _ in range(2))
    kinds = {"bfloat16": (ml_dtypes.bfloat16,) * 2, "mixed": (ml_dtypes.bfloat16, np.float32)}
    moments = [rng.standard_normal(16).astype(kind) for kind in kinds.get(state, (state, state))]
    before = [array.copy() for array in (params, *moments)]
    with pytest.raises(TypeError, match=message):
        adam_step(params, grads, *moments, step=1, lr=1e-2)
    for array, was in zip((params, *moments), before):
        assert np.array_equal(array.view(np.uint8), was.view(np.uint8))
