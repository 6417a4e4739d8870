"""LAMB against a float64 NumPy reference (torch has none), its per-tensor norms, the
0-norm cases, checkpoints and the CUDA simulator."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastmomentum
from fastmomentum.kernels import config, cpu, lamb_step, rules
from fastmomentum.kernels.tables import TensorTable

from . import reference
from .assertions import RTOL, assert_relative_close

SHAPES = [(20, 30), (30,), (5, 3, 4), (7,)]
OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.01},
    {"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-8, "maximize": True},
    {"lr": 1e-2, "weight_decay": 0.1, "bias_correction": False},
]


def _params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    params[-1].zero_()  # a zero tensor: its trust ratio is 1
    return [p.requires_grad_() for p in params]


def _run_reference(values, grads_per_step, options):
    settings = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}
    settings |= {"bias_correction": True, "maximize": False, **options}
    lr = settings.pop("lr")
    state = [(v.astype(np.float64), np.zeros(v.shape), np.zeros(v.shape)) for v in values]
    for step, grads in enumerate(grads_per_step, start=1):
        state = [
            reference.lamb(p, g, m, v, step=step, lr=lr, **settings)[:3]
            for (p, m, v), g in zip(state, grads)
        ]
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=["decay", "betas-maximize", "no-correction"])
def test_lamb_steps_each_tensor_by_its_own_trust_ratio(options, dtype):
    params = _params(dtype)
    values = [p.detach().numpy().copy() for p in params]
    optimizer = fastmomentum.LAMB(params, **options)
    generator = torch.Generator().manual_seed(1)
    grads_per_step = []
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=generator, dtype=dtype) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        grads_per_step.append([g.numpy() for g in grads])
    expected = _run_reference(values, grads_per_step, options)
    tolerance = RTOL[str(dtype).removeprefix("torch.")]
    for param, (want, m, v) in zip(params, expected):
        assert_relative_close(param.detach().numpy(), want, tolerance, "param")
        assert_relative_close(optimizer.state[param]["exp_avg"].numpy(), m, tolerance, "exp_avg")
        assert_relative_close(optimizer.state[param]["exp_avg_sq"].numpy(), v, tolerance, "v")
        assert float(optimizer.state[param]["step"]) == 10
    assert not torch.equal(params[-1], torch.zeros(7, dtype=dtype))  # moved by lr·u


def test_a_zero_update_leaves_the_tensor_where_it_is():
    """‖u‖ = 0 (zero gradient, no weight decay): r is 1 and nothing moves."""
    param = torch.randn(10, dtype=torch.float64, requires_grad=True)
    before = param.detach().clone()
    optimizer = fastmomentum.LAMB([param])
    param.grad = torch.zeros(10, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize("threading", ["serial", "threaded"])
def test_the_direction_pass_sums_each_tensors_squares(threading, monkeypatch):
    """The per-tensor norms are a segmented reduction in the direction pass: per segment
    in the loop, per entry on the host."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    rng = np.random.default_rng(2)
    lengths = [1000, 0, 5, 70000, 3]
    arrays = [
        [rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n), rng.random(n)]
        for n in lengths
    ]
    wanted = []
    for param, grad, m, v in arrays:  # the moments and u after the step, then the sums
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
        update = m / (np.sqrt(v) + 1e-6) + 0.01 * param
        wanted.append([np.sum(param**2), np.sum(update**2)])
    table = TensorTable(lengths, 4, np.float64, 2)
    for row, columns in enumerate(arrays):
        table.addresses[row] = [array.ctypes.data for array in columns]
    table.entry_values[:] = 1.0  # no bias correction
    coefficients = rules.lamb.coefficients(np.dtype(np.float64), (0.9, 0.999), 1e-6, 0.01, False)
    sums = cpu.launch(table, rules.lamb.DIRECTION, coefficients)
    np.testing.assert_allclose(sums, wanted, rtol=1e-12)
    assert sums[0, 1] > 0


def test_the_low_level_step_is_the_reference_and_returns_the_ratio():
    rng = np.random.default_rng(3)
    param = rng.standard_normal(500)
    m, v = np.zeros(500), np.zeros(500)
    want, want_m, want_v = param.copy(), np.zeros(500), np.zeros(500)
    for step in range(1, 6):
        grad = rng.standard_normal(500)
        ratio = lamb_step(param, grad, m, v, step=step, lr=1e-2, weight_decay=0.01)
        want, want_m, want_v, want_ratio = reference.lamb(
            want, grad, want_m, want_v, step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
            weight_decay=0.01, bias_correction=True, maximize=False,
        )  # fmt: skip
        assert ratio == pytest.approx(want_ratio, rel=1e-12)
    assert_relative_close(param, want, RTOL["float64"], "param")


def test_a_lamb_run_resumes_bit_identically():
    params = _params(torch.float32)
    optimizer = fastmomentum.LAMB(params, lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(4)

    def run(optim, group, steps):
        for _ in range(steps):
            for param in group:
                param.grad = torch.randn(param.shape, generator=generator)
            optim.step()

    run(optimizer, params, 3)
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = fastmomentum.LAMB(twins, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    state = generator.get_state()
    run(optimizer, params, 2)
    generator.set_state(state)
    run(resumed, twins, 2)
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def _aliased_params():
    """One memory as two parameters (the second after another), the even and odd
    columns of one matrix (disjoint elements, staged: strided), and one of its own."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    matrix = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    first, second = nn.Parameter(base), nn.Parameter(torch.empty(0, dtype=torch.float64))
    second.data = base  # the same memory, another parameter
    even, odd = nn.Parameter(matrix[:, ::2]), nn.Parameter(matrix[:, 1::2])
    other = nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
    return [first, even, other, odd, second]


@pytest.mark.parametrize("fused_zero_grad", [False, True])
def test_parameters_sharing_memory_take_whole_steps_in_turn(fused_zero_grad):
    """Each parameter's two passes run before the next parameter that shares its memory
    is stepped, as a loop over parameters would step them (the reference below)."""
    options = {"lr": 1e-2, "weight_decay": 0.01}
    params, wanted = _aliased_params(), _aliased_params()
    optimizer = fastmomentum.LAMB(params, fused_zero_grad=fused_zero_grad, **options)
    moments = [(np.zeros(p.shape), np.zeros(p.shape)) for p in wanted]
    generator = torch.Generator().manual_seed(8)
    for step in range(1, 11):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        for index, (param, grad) in enumerate(zip(wanted, grads)):
            view = param.detach().numpy()  # the memory itself, shared as the params share it
            new, m, v, _ = reference.lamb(
                view.copy(), grad.numpy(), *moments[index], step=step, betas=(0.9, 0.999),
                eps=1e-6, bias_correction=True, maximize=False, **options,
            )  # fmt: skip
            view[...], moments[index] = new, (m, v)
        if fused_zero_grad:
            assert all(not p.grad.any() for p in params)
    assert params[0].data_ptr() == params[-1].data_ptr()
    for ours, theirs in zip(params, wanted):
        assert_relative_close(ours.detach().numpy(), theirs.detach().numpy(), RTOL["float64"], "p")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: fastmomentum.LAMB(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: fastmomentum.LAMB(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (lambda p: fastmomentum.LAMB(p, weight_decay=-0.1), "Invalid weight_decay value"),
        (lambda p: fastmomentum.LAMB([p[0].detach().to(torch.bfloat16).requires_grad_()]),
         "LAMB steps float32, float64 parameters"),
    ],
    ids=["lr", "beta", "weight-decay", "bfloat16"],
)  # fmt: skip
def test_what_lamb_refuses(make, message):
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=message):
        make(params)


@pytest.mark.cudasim
def test_lamb_through_the_cuda_kernels_is_the_cpu_step(monkeypatch):
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        params = [p.detach()[:3].clone().requires_grad_() for p in _params(torch.float32)[:2]]
        optimizer = fastmomentum.LAMB(params, lr=1e-2, weight_decay=0.01)
        generator = torch.Generator().manual_seed(6)
        for _ in range(2):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        results.append(params)
    for cpu_param, cuda_param in zip(*results):
        torch.testing.assert_close(cuda_param, cpu_param, rtol=1e-6, atol=1e-7)
