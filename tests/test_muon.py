"""Muon against ``torch.optim.Muon``, and the shared suites' checks on matrices.

The shared suites step `models.SmallNet`, whose norms, biases and convolution Muon
refuses (torch's does too), so `cases.every_rule_of` leaves Muon out of them; its
capabilities are held here on parameters that are all 2-D (tall, wide, square, one row,
a transposed layout): numbers, checkpoints both ways, the step in backward, master
weights, bfloat16 state, stochastic rounding and Kahan summation, AMP, the fused
``zero_grad``, the CUDA kernels in the simulator, and torch's errors.

Tolerances: float32, float64 and float16 parameters match torch bit for bit over
`STEPS` steps (the element-wise passes round as torch's CPU kernels do and the
Newton–Schulz iteration is torch's operations in its order). bfloat16 parameters differ
where torch adds ``α·O`` in its scalar loop (``O`` and the parameter laid out apart: every
tall matrix, a transposed parameter; the remainder of its vector loop), rounding ``α·O``
to bfloat16 before the sum: measured ≤ 0.64 units in the last place of the largest
element after `STEPS` steps (9-14% of the elements of those matrices), bounded at 2.
"""

import copy

import numpy as np
import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import fastmomentum
from fastmomentum.kernels import config
from fastmomentum.muon import Settings, orthogonalized

from .assertions import assert_relative_close, refuse_host_reads

STEPS = 20
SHAPES = [(16, 40), (40, 16), (33, 33), (1, 7), (64, 96)]
CASES = {
    "nesterov": {"lr": 2e-2},
    "heavy-ball": {"lr": 2e-2, "nesterov": False, "momentum": 0.9},
    "match-rms-adamw": {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
}
EXACT_DTYPES = [torch.float32, torch.float64, torch.float16]


def matrices(dtype, seed=0, transposed=True):
    """Parameters of `SHAPES`, and one of them laid out transposed (a dense view)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    if transposed:
        params.append(torch.randn(24, 10, generator=generator).to(dtype).T)  # (10, 24)
    return [torch.nn.Parameter(p) for p in params]


def twins(params):
    return [torch.nn.Parameter(p.detach().clone().as_strided(p.shape, p.stride())) for p in params]


def gradients(params, generator):
    return [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]


def train(optimizers, param_lists, steps, seed=1):
    """``steps`` steps of each optimizer on the same random gradients."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = gradients(param_lists[0], generator)
        for optimizer, params in zip(optimizers, param_lists):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()


def assert_same_bits(ours, theirs, optimizer=None, reference=None):
    for p, q in zip(ours, theirs):
        assert torch.equal(p.detach(), q.detach()), (p - q).abs().max()
        if optimizer is not None:
            mine, torchs = optimizer.state[p], reference.state[q]
            assert mine.keys() == torchs.keys()
            assert torch.equal(mine["momentum_buffer"], torchs["momentum_buffer"])


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_bit_for_bit(case, dtype):
    params = matrices(dtype)
    ref_params = twins(params)
    ours = fastmomentum.Muon(params, **CASES[case])
    theirs = torch.optim.Muon(ref_params, **CASES[case])
    train([ours, theirs], [params, ref_params], STEPS)
    assert_same_bits(params, ref_params, ours, theirs)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_matches_torch_bit_for_bit_at_the_size_of_a_layer(dtype):
    """As above on matrices of 393,216 and 258,741 elements (the threaded loops), 3
    steps."""
    generator = torch.Generator().manual_seed(4)
    shapes = [(768, 512), (333, 777)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]
    ref_params = twins(params)
    ours = fastmomentum.Muon(params, lr=2e-2)
    theirs = torch.optim.Muon(ref_params, lr=2e-2)
    train([ours, theirs], [params, ref_params], 3)
    assert_same_bits(params, ref_params, ours, theirs)


def test_bfloat16_parameters_within_a_few_ulps_of_torch():
    params = matrices(torch.bfloat16)
    ref_params = twins(params)
    ours, theirs = fastmomentum.Muon(params, lr=2e-2), torch.optim.Muon(ref_params, lr=2e-2)
    train([ours, theirs], [params, ref_params], STEPS)
    for p, q in zip(params, ref_params):
        ulp = torch.finfo(torch.bfloat16).eps * q.detach().float().abs().max()
        assert (p.detach().float() - q.detach().float()).abs().max() <= 2 * ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (8, 8)])
def test_the_iteration_is_torchs_bit_for_bit(shape, dtype):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    settings = Settings(0.0, 0.0, 0.0, True, (3.4445, -4.7750, 2.0315), 1e-7, 5, None)
    expected = _zeropower_via_newtonschulz(update.clone(), settings.ns_coefficients, 5, 1e-7)
    assert torch.equal(orthogonalized(update.clone(), settings), expected)


def test_the_defaults_and_the_state_dict_are_torchs():
    params = matrices(torch.float32)
    ours, theirs = fastmomentum.Muon(params), torch.optim.Muon(twins(params))
    assert ours.defaults == {**theirs.defaults}
    train([ours], [params], 1)
    state = ours.state_dict()
    assert set(state["state"][0]) == {"momentum_buffer"}
    assert state["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()


@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_a_checkpoint_resumes_in_the_other_library(direction):
    first, second = (
        (torch.optim.Muon, fastmomentum.Muon)
        if direction == "torch-to-ours"
        else (fastmomentum.Muon, torch.optim.Muon)
    )
    params = matrices(torch.float32)
    optimizer = first(params, lr=2e-2)
    train([optimizer], [params], 3)
    resumed_params, continued_params = twins(params), twins(params)
    resumed = second(resumed_params, lr=2e-2)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    continued = first(continued_params, lr=2e-2)
    continued.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train([resumed, continued], [resumed_params, continued_params], 4, seed=5)
    assert_same_bits(resumed_params, continued_params, resumed, continued)


def test_errors_are_torchs_and_change_nothing():
    params = matrices(torch.float32)
    for options in (
        {"lr": -1.0},
        {"momentum": -0.1},
        {"weight_decay": -0.1},
        {"adjust_lr_fn": "other"},
        {"lr": torch.tensor([1.0, 2.0])},
    ):
        with pytest.raises(ValueError) as theirs:
            torch.optim.Muon(twins(params), **options)
        with pytest.raises(ValueError, match=str(theirs.value).replace("(", r"\(")[:40]):
            fastmomentum.Muon(params, **options)
    vector = torch.nn.Parameter(torch.randn(5))
    message = r"Muon only supports 2D parameters whereas we found a parameter with size"
    for make in (torch.optim.Muon, fastmomentum.Muon):
        with pytest.raises(ValueError, match=message):
            make([params[0], vector])
    optimizer = fastmomentum.Muon(params)
    with pytest.raises(ValueError, match=message):  # torch's would fail at its step
        optimizer.add_param_group({"params": [vector]})
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    for key, value, error in (
        ("ns_steps", 100, "Number of steps must be less than 100"),
        ("ns_coefficients", (1.0, 2.0), "Coefficients must be a tuple of exactly 3 values"),
    ):
        optimizer.param_groups[0][key] = value
        with pytest.raises(ValueError, match=error):
            optimizer.step()
        optimizer.param_groups[0][key] = optimizer.defaults[key]
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not optimizer.state


class Matrices(torch.nn.Module):
    """Three bias-free linear layers: every parameter 2-D."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(12, 30, bias=False),
            torch.nn.Tanh(),
            torch.nn.Linear(30, 20, bias=False),
            torch.nn.Tanh(),
            torch.nn.Linear(20, 3, bias=False),
        ).to(dtype)

    def forward(self, x):
        return self.layers(x)


def loss_of(model, step, dtype):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=generator).to(dtype)
    return model(x).float().square().mean()


def fit(model, optimizer, steps, dtype, scaler=None, first=0):
    in_backward = getattr(optimizer, "steps_in_backward", False)
    for step in range(first, steps):
        if not in_backward:
            optimizer.zero_grad()
        loss = loss_of(model, step, dtype)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            continue
        loss.backward()
        if not in_backward:
            optimizer.step()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"nesterov": False},
        {"dtype": torch.bfloat16},
        {"dtype": torch.float16},
        {"dtype": torch.bfloat16, "master_weights": True},
        {"state_dtype": torch.bfloat16},
        {"dtype": torch.bfloat16, "stochastic_rounding": True, "rounding_seed": 3},
        {"dtype": torch.float16, "kahan_sum": True},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()) or "float32",
)
def test_the_step_in_backward_is_the_ordinary_step_bit_for_bit(options):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    model = Matrices(dtype)
    ref_model = copy.deepcopy(model)
    ours = fastmomentum.Muon(model.parameters(), lr=2e-2, step_in_backward=True, **options)
    ref = fastmomentum.Muon(ref_model.parameters(), lr=2e-2, **options)
    fit(model, ours, 6, dtype)
    fit(ref_model, ref, 6, dtype)
    assert all(p.grad is None for p in model.parameters())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p.detach(), q.detach())
        for key, value in ref.state[q].items():
            assert torch.equal(ours.state[p][key], value), key


@pytest.mark.parametrize(
    "options",
    [
        {"stochastic_rounding": True, "rounding_seed": 3},
        {"kahan_sum": True},
        {"master_weights": True},
    ],
    ids=lambda options: next(iter(options)),
)
def test_16_bit_options_resume_bit_identically(options):
    model = Matrices(torch.bfloat16)
    optimizer = fastmomentum.Muon(model.parameters(), lr=2e-2, **options)
    fit(model, optimizer, 3, torch.bfloat16)
    resumed_model = copy.deepcopy(model)
    resumed = fastmomentum.Muon(resumed_model.parameters(), lr=2e-2, **options)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    fit(model, optimizer, 7, torch.bfloat16, first=3)
    fit(resumed_model, resumed, 7, torch.bfloat16, first=3)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_master_weights_are_torchs_float32_step_on_the_16_bit_gradients():
    model = Matrices(torch.bfloat16)
    ref_model = Matrices(torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ours = fastmomentum.Muon(model.parameters(), lr=2e-2, master_weights=True)
    theirs = torch.optim.Muon(ref_model.parameters(), lr=2e-2)
    for step in range(5):
        ours.zero_grad()
        loss_of(model, step, torch.bfloat16).backward()
        ours.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = p.grad.float()
        theirs.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(ours.state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), q.detach().bfloat16())


def test_bfloat16_state_is_the_float32_step_with_its_buffer_rounded():
    """Against torch's float32 step with the buffer rounded to bfloat16 after each step
    (and the Nesterov update computed from it, as stored): bit for bit."""
    params = matrices(torch.float32)
    ref_params = twins(params)
    ours = fastmomentum.Muon(params, lr=2e-2, state_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(ref_params, lr=2e-2, nesterov=False, momentum=0.0)  # O = NS(g)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = gradients(params, generator)
        for p, q, g in zip(params, ref_params, grads):
            p.grad = g.clone()
            buffer = theirs.state[q].get("momentum_buffer", torch.zeros_like(q))
            new = buffer.lerp(g, 1 - 0.95).bfloat16().float()  # the buffer as we keep it
            q.grad = g.lerp(new, 0.95)  # U, which torch's step without momentum applies
        ours.step()
        theirs.step()
        for p, q in zip(params, ref_params):
            theirs.state[q]["momentum_buffer"] = ours.state[p]["momentum_buffer"].float()
    assert_same_bits(params, ref_params)
    assert all(ours.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in params)


def test_grad_scaler_steps_as_torch_on_unscaled_gradients():
    model, ref_model = Matrices(torch.float32), Matrices(torch.float32)
    ours = fastmomentum.Muon(model.parameters(), lr=2e-2)
    theirs = torch.optim.Muon(ref_model.parameters(), lr=2e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fit(model, ours, 4, torch.float32, scaler=scaler)
    fit(ref_model, theirs, 4, torch.float32)
    assert_same_bits(list(model.parameters()), list(ref_model.parameters()), ours, theirs)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_fused_zero_grad_steps_as_step_then_zero_grad():
    params = matrices(torch.float32)
    ref_params = twins(params)
    ours = fastmomentum.Muon(params, fused_zero_grad=True, flat_gradients=True)
    theirs = torch.optim.Muon(ref_params)
    train([ours, theirs], [params, ref_params], 3)
    assert_same_bits(params, ref_params, ours, theirs)
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_parameters_sharing_memory_and_frozen_ones_step_as_torchs_loop():
    """Two matrices over rows of one tensor, three rows in common: torch's loop steps the
    second from the first's result (our waves); a parameter without a gradient stays."""
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    ref_base = base.clone()
    params = [torch.nn.Parameter(base[:5]), torch.nn.Parameter(base[2:]), *matrices(torch.float32)]
    ref_params = [torch.nn.Parameter(ref_base[:5]), torch.nn.Parameter(ref_base[2:])]
    ref_params += twins(params[2:])
    ours, theirs = fastmomentum.Muon(params, lr=0.1), torch.optim.Muon(ref_params, lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q, g in zip(params[:-1], ref_params[:-1], gradients(params[:-1], generator)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(base, ref_base)
    assert_same_bits(params, ref_params)
    assert params[-1] not in ours.state


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_cuda_kernels_in_the_simulator_are_the_cpu_kernels(dtype, monkeypatch):
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    params = [
        torch.nn.Parameter(torch.randn(7, 9).to(dtype)),
        torch.nn.Parameter(torch.randn(11, 3).to(dtype)),
    ]
    ref_params = twins(params)
    theirs = fastmomentum.Muon(ref_params, lr=2e-2)
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    ours = fastmomentum.Muon(params, lr=2e-2)
    assert all(type(b.kernels).__name__ == "TorchStreamKernels" for bs in ours.buckets for b in bs)
    train([ours, theirs], [params, ref_params], 3)
    for p, q in zip(params, ref_params):
        assert_relative_close(p.detach().float(), q.detach().float(), 0.0, "param")
        assert_relative_close(
            ours.state[p]["momentum_buffer"].float(),
            theirs.state[q]["momentum_buffer"].float(),
            0.0,
            "momentum_buffer",
        )


def _simulated_gpu(monkeypatch):
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ITEMS_PER_THREAD", 2)  # parameters of several segments
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    monkeypatch.setattr(config, "FORCE_CUDA", True)


def _small_matrices(dtype):
    """Tall, wide and one row (three shape factors), small: the simulator is slow."""
    generator = torch.Generator().manual_seed(2)
    shapes = ((12, 5), (5, 12), (1, 7))
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def _amp_step(pairs, generator, found):
    """One step of each ``(optimizer, params)`` on gradients scaled by 256, with
    GradScaler's ``grad_scale`` and ``found_inf`` (``found``) set as it sets them."""
    grads = gradients(pairs[0][1], generator)
    for optimizer, params in pairs:
        optimizer.grad_scale = torch.tensor(256.0)
        optimizer.found_inf = torch.tensor(found)
        for p, g in zip(params, grads):
            p.grad = (256.0 * g.float()).to(p.dtype)
        optimizer.step()


@pytest.mark.cudasim
@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (torch.float32, {"lr": torch.tensor(2e-2)}),
        (torch.float64, {"lr": 3e-2, "nesterov": False, "momentum": 0.9}),
        (torch.bfloat16, {"lr": 2e-2, "adjust_lr_fn": "match_rms_adamw"}),
    ],
    ids=["float32-lr-tensor", "float64-heavy-ball", "bfloat16-match-rms"],
)
def test_a_capturable_step_is_the_ordinary_step(dtype, options, monkeypatch):
    """``capturable=True`` (the coefficients and each parameter's −lr' computed on the
    device, in float64 as the host computes them) gives the ordinary step's bits, both
    through the CUDA kernels in the simulator, over 4 steps; AMP's values read on
    the device: with found_inf set nothing moves, without, the step is the ordinary one
    (which reads them on the host)."""
    _simulated_gpu(monkeypatch)
    params = _small_matrices(dtype)
    ref_params = twins(params)
    ordinary = fastmomentum.Muon(ref_params, weight_decay=0.1, **options)
    capturable = fastmomentum.Muon(params, weight_decay=0.1, capturable=True, **options)
    assert all(b.counts_on_device for b in capturable.buckets[0])
    train([capturable, ordinary], [params, ref_params], 4)
    assert_same_bits(params, ref_params, capturable, ordinary)
    generator = torch.Generator().manual_seed(3)
    pairs = [(capturable, params), (ordinary, ref_params)]
    before = [p.detach().clone() for p in params]
    _amp_step(pairs, generator, 1.0)
    assert_same_bits(params, before)
    _amp_step(pairs, generator, 0.0)
    assert_same_bits(params, ref_params, capturable, ordinary)
    assert not any(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.cudasim
def test_a_steady_capturable_step_uploads_nothing_and_reads_nothing(monkeypatch):
    """After the first steps, a capturable step launches its two passes per bucket,
    copies nothing to the GPU through the launch tables and reads no tensor on the
    host, AMP's values and a tensor lr included."""
    from fastmomentum.kernels.calls import cuda_kernels

    _simulated_gpu(monkeypatch)
    params = _small_matrices(torch.float32)
    optimizer = fastmomentum.Muon(params, lr=torch.tensor(1e-2), capturable=True)
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    counts = cuda_kernels().COUNTS
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        for p, g in zip(params, gradients(params, generator)):
            if p.grad is None:  # laid out as the parameter, as autograd's
                p.grad = torch.empty_like(p.detach())
            p.grad.copy_(g)  # where backward adds them
        counts.reset()
        if step == 3:
            refuse_host_reads(monkeypatch)
        optimizer.step()
    monkeypatch.undo()
    launches = 2 * sum(len(b) for b in optimizer.buckets)
    assert counts.as_dict() == {"launches": launches, "uploads": 0, "waits": 0}


def test_live_coefficients_are_the_hosts():
    """The capturable passes' coefficients (`rules.muon.live_momentum`, `live_apply`)
    are the float64 values the host computes, and ``−lr'`` from the factor is the host's
    adjusted lr, for every `SHAPES` shape and ``adjust_lr_fn``."""
    from fastmomentum.kernels import rules

    f64, lr = np.float64, 0.0123
    for momentum in (0.95, 0.3):
        settings = rules.muon.momentum_live_settings(momentum)
        host = rules.muon.momentum_coefficients(f64, momentum, 1024.0)
        assert rules.muon.live_momentum((), f64(lr), 1.0 / 1024.0, settings) == (host, (), ())
    settings = rules.muon.apply_live_settings(0.1)
    host = rules.muon.apply_coefficients(f64, lr, 0.1)
    assert rules.muon.live_apply((), f64(lr), 1.0, settings)[0] == host
    for shape in [*SHAPES, (10, 24)]:
        for function in rules.muon.ADJUST_LR_FNS:
            factor = rules.muon.adjusted_lr_factor(function, shape)
            assert lr * factor == rules.muon.adjusted_lr(lr, function, shape)
