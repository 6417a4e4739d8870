"""``capturable=True`` (`fastmomentum.capture`, `kernels.capturable`) in Numba's CUDA
simulator: the torch optimizers run the CUDA kernels on CPU tensors
(``config.FORCE_CUDA``), which stand for GPU tensors (the simulator's device memory is
host memory). A CUDA graph cannot be captured here: what a capture needs is checked
instead (no host read, no upload, the launch tables kept; `devices.capturing` patched).
"""

import copy
import math

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum import devices
from fastmomentum.kernels import config, rules
from fastmomentum.kernels.calls import cuda_kernels

from .assertions import refuse_host_reads
from .cases import ADAM_CASES, CASES
from .models import batches, make_model, train

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
pytestmark = pytest.mark.cudasim

STEPS = 8


@pytest.fixture(autouse=True)
def simulated_gpu(monkeypatch):
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ITEMS_PER_THREAD", 2)  # entries of several segments
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)


def twins(name, options, dtype=torch.float64, tiny=True):
    """Two copies of a model (`models.TinyNet`, or with ``tiny=False`` the shared
    `models.SmallNet`, 7× the elements), with ``name`` ordinary and capturable."""
    model = make_model(dtype, tiny=tiny)
    twin = copy.deepcopy(model)
    ordinary = getattr(fastmomentum, name)(model.parameters(), **options)
    capturable = getattr(fastmomentum, name)(twin.parameters(), capturable=True, **options)
    return (model, ordinary), (twin, capturable)


def assert_same(ordinary, capturable, models):
    """Parameters, state and step counts equal, bit for bit."""
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        mine, theirs = ordinary.state[p], capturable.state[q]
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(case, torch.float32) for case in ADAM_CASES] + [(ADAM_CASES[-2], torch.float64)],
    ids=str,
)
def test_a_capturable_step_is_the_ordinary_step(case, dtype):
    """Coefficients computed on the device (float64, rounded to the dtype as the host
    rounds them) give the ordinary step's numbers, bit for bit, over `STEPS` steps
    (AdamW: the case with decoupled weight decay)."""
    shared = case == ADAM_CASES[0] and dtype == torch.float32  # one case on the shared model
    (model, ordinary), (twin, capturable) = twins("Adam", {"lr": 0.01, **case}, dtype, not shared)
    train(model, ordinary, STEPS, dtype)
    train(twin, capturable, STEPS, dtype)
    assert_same(ordinary, capturable, (model, twin))
    step = capturable.state[next(twin.parameters())]["step"]
    assert float(step) == STEPS and step.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "options", "dtype"),
    [
        ("NAdam", CASES["nadam"][1], torch.float32),
        # float64 counts and mu_product (torch's default dtype float64): not rounded to float32
        ("NAdam", {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}, torch.float64),
        ("RAdam", CASES["radam"][1], torch.float32),  # ρ_t > 5 from step 6: both branches
        ("RAdam", CASES["radam-decoupled"][1], torch.float32),
        ("Adamax", {**CASES["adamax"][1], "maximize": True}, torch.float32),
        ("RMSprop", CASES["rmsprop"][1], torch.float32),  # centered, momentum
        ("RMSprop", {"lr": torch.tensor(1e-3), "weight_decay": 1e-2}, torch.float32),
        ("Adagrad", {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.1, "maximize": True},
         torch.float32),
        ("Adagrad", {"lr": torch.tensor(0.05), "lr_decay": 0.3}, torch.float64),
        ("Lion", {"lr": 1e-3, "weight_decay": 0.5}, torch.float32),
        ("SGD", {"lr": 0.05, "weight_decay": 0.1, "maximize": True}, torch.float32),
        ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
         torch.float32),
        ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                 "momentum_convention": "lr_folded"}, torch.float64),
        ("LAMB", {"lr": 1e-2, "weight_decay": 0.1}, torch.float32),
        ("LAMB", {"lr": torch.tensor(1e-2), "bias_correction": False, "maximize": True},
         torch.float64),
    ],
    ids=["nadam", "nadam-decoupled-float64", "radam", "radam-decoupled", "adamax-maximize",
         "rmsprop-centered-momentum", "rmsprop-lr-tensor", "adagrad-maximize",
         "adagrad-lr-tensor-float64", "lion", "sgd-plain-maximize", "sgd-dampening",
         "sgd-nesterov-lr-folded-float64", "lamb", "lamb-lr-tensor-maximize-float64"],
)  # fmt: skip
def test_other_optimizers_capturable_steps_are_their_ordinary_steps(name, options, dtype):
    """As `test_a_capturable_step_is_the_ordinary_step`, for each other optimizer with
    live coefficients, NAdam's ``mu_product`` included (with float32 counts, rounded to
    float32 as the host rounds it); SGD's ``first_step`` set by the host in the table;
    LAMB's trust ratios computed on the device from its norms there, as the ordinary
    CUDA step computes them. Lion and SGD keep no count."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the dtype of the counts (`bucket.step_dtype`)
    try:
        (model, ordinary), (twin, capturable) = twins(name, options, dtype)
        train(model, ordinary, STEPS, dtype)
        train(twin, capturable, STEPS, dtype)
    finally:
        torch.set_default_dtype(default)
    assert_same(ordinary, capturable, (model, twin))
    assert all(b.counts_on_device for b in capturable.buckets[0])  # the capturable kernels
    if name not in ("Lion", "SGD"):
        step = capturable.state[next(twin.parameters())]["step"]
        assert float(step) == STEPS and step.dtype == dtype


@pytest.mark.parametrize("name", ["Adam", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "LAMB"])
def test_an_empty_parameter_counts_its_steps_as_the_ordinary_step(name):
    """An empty parameter has no elements to step, but torch counts its steps (and NAdam
    its ``mu_product``): the capturable kernel advances its count too (found on an H200
    by bench.gpu_check, where a (0,) parameter kept step 0 against torch's 10)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(37,), (0,), (3, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ordinary = getattr(fastmomentum, name)(params, lr=1e-2)
    capturable = getattr(fastmomentum, name)(twins, lr=1e-2, capturable=True)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        ordinary.step()
        capturable.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in ordinary.state[p].items():
            assert torch.equal(capturable.state[q][key], value), (p.shape, key)
    assert float(capturable.state[twins[1]]["step"]) == 3


LIVE_STEPS = range(1, 1001)


def _live(rule, scalars, lr, settings, scale=1024.0):
    """``rule.live_coefficients`` as a kernel calls it (float64 counts and lr)."""
    scalars = tuple(np.float64(value) for value in scalars)
    return rule.live_coefficients(scalars, np.float64(lr), 1.0 / scale, settings)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.6), (0.9, 1.0)], ids=str)
@np.errstate(all="ignore")
def test_live_coefficients_are_the_hosts(betas):
    """Each rule's live coefficients, shared and per step, are the float64 values its
    host functions compute (before both are rounded to the arrays' dtype), at each of
    the first 1000 steps; NAdam's product of μ too, kept in float32 or float64. β2 = 1,
    set after construction: the IEEE values the host gives (RAdam: rectified, NaN).
    torch's ``(1 − β2ᵗ) ** 0.5`` (C's pow) is not always the square root: for β2 = 0.6
    at t = 72 and 73 among these steps (for 0.999 first at t = 1270), so a rule that took
    the square root fails here."""
    if betas[1] == 0.6:
        assert any((1 - 0.6**t) ** 0.5 != math.sqrt(1 - 0.6**t) for t in LIVE_STEPS)
    lr, eps, decay, psi, f64 = 0.01, 1e-8, 0.1, 4e-3, np.float64
    for rule in (rules.adam, rules.radam):
        for decoupled, maximize in ((False, True), (True, False)):
            settings = rule.live_settings(betas, eps, decay, decoupled, maximize)
            host = rule.coefficients(f64, lr, betas, eps, decay, decoupled, maximize, 1024.0)
            assert _live(rule, (0.0,), lr, settings)[0] == host
    settings = rules.adam.live_settings(betas, eps, decay, False, False)
    for t in LIVE_STEPS:
        live = _live(rules.adam, (t - 1,), lr, settings)[1]
        assert live == rules.adam.step_coefficients(f64, t, lr, betas)
    settings = rules.radam.live_settings(betas, eps, decay, False, False)
    for t in LIVE_STEPS:
        live = _live(rules.radam, (t - 1,), lr, settings)[1]
        np.testing.assert_array_equal(live, rules.radam.step_values([t], lr, betas)[0])
    settings = rules.adamax.live_settings(betas[::-1], eps, decay, True)  # β1 = 1 too
    live = _live(rules.adamax, (0.0,), lr, settings)[0]
    assert live == rules.adamax.coefficients(f64, betas[::-1], eps, decay, True, 1024.0)
    for t in LIVE_STEPS:
        live = _live(rules.adamax, (t - 1,), lr, settings)[1]
        assert live == tuple(rules.adamax.step_coefficients_per_entry(f64, [t], lr, betas[::-1])[0])
    settings = rules.rmsprop.live_settings(betas[1], eps, decay, betas[0], True)
    host = rules.rmsprop.coefficients(f64, lr, betas[1], eps, decay, betas[0], True, 1024.0)
    assert _live(rules.rmsprop, (4.0,), lr, settings) == (host, (), (5.0,))
    settings = rules.adagrad.live_settings(eps, decay, betas[1], True)  # lr_decay: β2
    host = rules.adagrad.coefficients(f64, eps, decay, True, 1024.0)
    assert _live(rules.adagrad, (0.0,), lr, settings)[0] == host
    for t in LIVE_STEPS:
        _, entry, (step,) = _live(rules.adagrad, (t - 1,), lr, settings)
        host = rules.adagrad.step_coefficients_per_entry(f64, [t], lr, betas[1])[0]
        assert entry == tuple(host) and step == t
    settings = rules.lion.live_settings(betas, decay, True)
    host = rules.lion.coefficients(f64, lr, betas, decay, True, 1024.0)
    assert _live(rules.lion, (), lr, settings) == (host, (), ())
    for convention in rules.sgd.CONVENTIONS:
        settings = rules.sgd.live_settings(betas[0], betas[1], decay, True, convention)
        host = rules.sgd.momentum_coefficients(
            f64, lr, betas[0], betas[1], decay, True, convention, 1024.0
        )
        assert rules.sgd.live_momentum((), f64(lr), 1.0 / 1024.0, settings) == (host, (), ())
        host = rules.sgd.plain_coefficients(f64, lr, decay, True, 1024.0)
        assert rules.sgd.live_plain((), f64(lr), 1.0 / 1024.0, settings) == (host, (), ())
    for bias_correction, maximize in ((True, True), (False, False)):
        settings = rules.lamb.live_settings(betas, eps, decay, bias_correction, maximize)
        host = rules.lamb.coefficients(f64, betas, eps, decay, maximize, 1024.0)
        direction, apply = rules.lamb.live_direction, rules.lamb.live_apply
        assert direction((f64(0),), f64(lr), 1.0 / 1024.0, settings)[0] == host
        host = rules.lamb.apply_coefficients(f64, eps, decay)
        assert apply((f64(1),), f64(lr), 1.0 / 1024.0, settings)[0] == host
        for t in LIVE_STEPS:
            _, entry, (step,) = direction((f64(t - 1),), f64(lr), 1.0, settings)
            host = rules.lamb.bias_corrections(f64, t, betas, bias_correction)[0]
            assert entry == tuple(host) and step == t
            _, entry, (step,) = apply((f64(t),), f64(lr), 1.0, settings)
            host = rules.lamb.apply_step_coefficients_on_device(f64, [host], lr)[0]
            assert entry == tuple(host) and step == t
    for dtype in (np.float32, np.float64):
        settings = rules.nadam.live_settings(betas, eps, decay, False, False, psi, dtype)
        product = dtype(1.0)
        for t in LIVE_STEPS:
            shared, entry, (step, new) = _live(rules.nadam, (t - 1, product), lr, settings)
            products, rows = rules.nadam.step_values([t], [product], lr, betas, psi, dtype)
            assert (step, new) == (t, products[0]) and entry == tuple(rows[0])
            product = products[0]


def test_live_settings_name_what_each_live_function_takes():
    """`KernelSpec.live_settings` (what bench.gpu_static types the kernels with) has a
    field per value of the rule module's ``live_settings``."""
    samples = {
        "adam": ((0.9, 0.99), 1e-8, 0.1, True, False),
        "radam": ((0.9, 0.99), 1e-8, 0.1, True, False),
        "nadam": ((0.9, 0.99), 1e-8, 0.1, True, False, 4e-3, np.float32),
        "adamax": ((0.9, 0.99), 1e-8, 0.1, False),
        "rmsprop": (0.99, 1e-8, 0.1, 0.9, False),
        "adagrad": (1e-10, 0.1, 0.01, False),
        "lion": ((0.9, 0.99), 0.1, False),
        "sgd_plain": (0.0, 0.0, 0.1, False, "pytorch"),
        "sgd_momentum": (0.9, 0.1, 0.1, False, "lr_folded"),
        "lamb_direction": ((0.9, 0.99), 1e-6, 0.1, True, False),
        "muon_momentum": (0.95,),
    }
    functions = {"muon_momentum": rules.muon.momentum_live_settings}
    live = {spec.name: spec for spec in rules.SPECS if spec.live is not None}
    assert set(live) == set(samples)
    for name, spec in live.items():
        function = functions.get(name) or getattr(rules, name.split("_")[0]).live_settings
        values = function(*samples[name])
        assert len(values) == len(spec.live_settings._fields)
    values = rules.muon.apply_live_settings(0.1)
    assert len(values) == len(rules.muon.APPLY_ON_DEVICE.live_settings._fields)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("Adam", {"capturable": True}),
        ("SGD", {"momentum": 0.9, "capturable": True}),
        ("Adagrad", {"capturable": True}),
        ("Lion", {"capturable": True}),
        ("LAMB", {"capturable": True}),
        ("AdamW", {"fused": True}),
        ("SGD", {"momentum": 0.9, "fused": True}),
    ],
    ids=["adam", "sgd", "adagrad", "lion", "lamb", "adamw-fused", "sgd-fused"],
)
def test_a_steady_step_launches_once_uploads_nothing_and_reads_nothing(name, options, monkeypatch):
    """With AMP's scale and found_inf set as GradScaler sets them, a step after the first
    two (the second adopts the parameters: new addresses; SGD's marks its buffers made)
    launches once per bucket and pass (LAMB: 2), copies nothing to the GPU and reads no
    tensor on the host: with ``capturable=True``, or ``fused=True`` (on CUDA:
    `capture.on_device`)."""
    model = make_model(torch.float32, tiny=True)
    optimizer = getattr(fastmomentum, name)(model.parameters(), lr=0.01, **options)
    optimizer.grad_scale = torch.tensor(1024.0)
    optimizer.found_inf = torch.tensor(0.0)
    counts = cuda_kernels().COUNTS
    tokens, targets = next(iter(batches(1, torch.float32)))
    for step in range(4):
        torch.nn.functional.mse_loss(model(tokens), targets).backward()  # accumulates
        counts.reset()
        if step == 3:
            refuse_host_reads(monkeypatch)
        optimizer.step()
    monkeypatch.undo()
    launches = sum(len(b) for b in optimizer.buckets) * (2 if name == "LAMB" else 1)
    assert counts.as_dict() == {"launches": launches, "uploads": 0, "waits": 0}


@pytest.mark.parametrize(
    ("name", "options", "fused_zero_grad"),
    [
        ("AdamW", {}, False),
        ("AdamW", {}, True),
        ("NAdam", {}, False),
        ("Adagrad", {"lr_decay": 0.1}, False),
        ("Lion", {}, True),
        ("SGD", {"momentum": 0.9, "dampening": 0.5}, False),
        ("LAMB", {}, True),
    ],
)
def test_found_inf_skips_the_step_on_the_device(name, options, fused_zero_grad):
    """GradScaler's values read by the kernel: with found_inf set nothing moves and no
    count advances, nor NAdam's mu_product (gradients zeroed with fused_zero_grad, else
    left scaled); without, the step equals the ordinary one, which reads them on the
    host, gradients left unscaled as torch's fused optimizers leave them. SGD's first
    steps (skipped, then taken) read found_inf on the host: its buffers are made then."""
    options = {"lr": 0.01, "weight_decay": 0.1, "fused_zero_grad": fused_zero_grad, **options}
    (model, ordinary), (twin, capturable) = twins(name, options, torch.float32)
    warm_up = 0 if name == "SGD" else 3
    train(model, ordinary, warm_up, torch.float32)
    train(twin, capturable, warm_up, torch.float32)
    tokens, targets = next(iter(batches(1, torch.float32, seed=5)))
    for found in (1.0, 0.0, 1.0, 0.0):
        grads = []
        for m, optimizer in ((model, ordinary), (twin, capturable)):
            optimizer.grad_scale = torch.tensor(256.0)
            optimizer.found_inf = torch.tensor(found)
            optimizer.zero_grad()
            (256.0 * torch.nn.functional.mse_loss(m(tokens), targets)).backward()
            optimizer.step()
            grads.append([p.grad.clone() for p in m.parameters()])
        assert_same(ordinary, capturable, (model, twin))
        for mine, theirs in zip(*grads):
            assert torch.equal(mine, theirs)
    if "step" in capturable.state[next(twin.parameters())]:
        assert float(capturable.state[next(twin.parameters())]["step"]) == warm_up + 2
    assert all(b.counts_on_device for b in capturable.buckets[0])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "SGD", "Lion"])
def test_a_fused_step_on_cuda_keeps_its_counts_there_as_torchs_fused_step(name):
    """``fused=True`` on CUDA parameters steps as ``capturable=True`` does (torch's fused
    optimizers keep their counts on the device and read GradScaler's values there): the
    ordinary step's numbers, bit for bit, with the counts on the device; with an option
    the device path lacks (stochastic rounding), or on the CPU, counts stay CPU tensors."""
    options = {"lr": 0.01, "weight_decay": 0.1}
    if name == "SGD":
        options["momentum"] = 0.9
    (model, ordinary), (twin, _) = twins(name, options, torch.float32)
    fused = getattr(fastmomentum, name)(twin.parameters(), fused=True, **options)
    train(model, ordinary, STEPS, torch.float32)
    train(twin, fused, STEPS, torch.float32)
    assert_same(ordinary, fused, (model, twin))
    assert all(b.counts_on_device for b in fused.buckets[0])
    assert not any(b.counts_on_device for b in ordinary.buckets[0])
    sixteen = make_model(torch.bfloat16, tiny=True)
    rounded = getattr(fastmomentum, name)(
        sixteen.parameters(), fused=True, stochastic_rounding=True, **options
    )
    train(sixteen, rounded, 2, torch.bfloat16)
    assert not any(b.counts_on_device for b in rounded.buckets[0])


def test_a_fused_step_on_the_cpu_keeps_cpu_counts(monkeypatch):
    monkeypatch.setattr(config, "FORCE_CUDA", False)
    model = make_model(torch.float32, tiny=True)
    optimizer = fastmomentum.Adam(model.parameters(), lr=0.01, fused=True)
    train(model, optimizer, 2, torch.float32)
    assert not any(b.counts_on_device for b in optimizer.buckets[0])
    assert optimizer.state[next(model.parameters())]["step"].device.type == "cpu"


def test_an_lr_tensor_is_read_on_the_device():
    """A float32 lr tensor on the parameters' device, changed in place between steps (as
    a scheduler updates a tensor lr), is read by the kernel at each step: the ordinary
    step with the same value as a float gives the same bits."""
    dtype = torch.float32
    (model, ordinary), (twin, capturable) = twins("Adam", {"lr": 0.01}, dtype)
    lr = torch.tensor(0.01)
    capturable.param_groups[0]["lr"] = lr
    for step, (tokens, targets) in enumerate(batches(STEPS, dtype)):
        lr.fill_(0.01 * 0.7**step)
        ordinary.param_groups[0]["lr"] = float(lr)
        for m, optimizer in ((model, ordinary), (twin, capturable)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(m(tokens), targets).backward()
            optimizer.step()
    assert_same(ordinary, capturable, (model, twin))


def test_a_capture_copies_its_tables_into_arrays_of_its_own(monkeypatch):
    """While a graph is being captured each launch table is copied whole into device
    arrays of the capture's own (a graph replays the copies it captured; the arrays
    other launches read are not written), even where nothing changed; a capture with
    gradients at new addresses (torch's recipe: ``zero_grad(set_to_none=True)`` before
    capturing) steps as an ordinary step does."""
    dtype = torch.float32
    (model, ordinary), (twin, capturable) = twins("Adam", {"lr": 0.01}, dtype)
    train(model, ordinary, 3, dtype)
    train(twin, capturable, 3, dtype)
    tables = [t for b in capturable.buckets[0] for t in b.planner._tables.values()]
    before = [(t, key, *map(list, kept)) for t in tables for key, kept in t.on_device.items()]
    monkeypatch.setattr(devices, "capturing", lambda device: True)
    train(model, ordinary, 4, dtype, first=3)
    counts = cuda_kernels().COUNTS
    counts.reset()
    train(twin, capturable, 4, dtype, first=3)
    assert counts.uploads == 4 * counts.launches  # addresses, segments, values, counts
    for table, key, copies, arrays in before:  # the arrays of earlier launches: as they were
        assert not any(a is b for a, b in zip(table.on_device[key][1], arrays))
        for host, array in zip(copies, arrays):
            assert (array.copy_to_host() == host).all()
    assert_same(ordinary, capturable, (model, twin))


def test_capturable_can_be_switched_and_the_counts_follow():
    """``capturable`` switched on after some steps (as a state dict of torch's capturable
    optimizer switches it): the counts move to the device with their values, and the
    run goes on as the ordinary one; switched off, back to CPU tensors."""
    dtype = torch.float64
    model = make_model(dtype, tiny=True)
    twin = copy.deepcopy(model)
    ordinary = fastmomentum.Adam(model.parameters(), lr=0.01)
    switched = fastmomentum.Adam(twin.parameters(), lr=0.01)
    train(model, ordinary, 3, dtype)
    train(twin, switched, 3, dtype)
    switched.param_groups[0]["capturable"] = True
    train(model, ordinary, 6, dtype, first=3)
    train(twin, switched, 6, dtype, first=3)
    assert_same(ordinary, switched, (model, twin))
    assert all(b.counts_on_device for b in switched.buckets[0])
    loaded = fastmomentum.Adam(copy.deepcopy(twin).parameters(), lr=0.01)
    loaded.load_state_dict(switched.state_dict())  # capturable=True comes with it
    assert loaded.param_groups[0]["capturable"] and not ordinary.param_groups[0]["capturable"]
    switched.param_groups[0]["capturable"] = False
    train(model, ordinary, 8, dtype, first=6)
    train(twin, switched, 8, dtype, first=6)
    assert_same(ordinary, switched, (model, twin))
    assert not any(b.counts_on_device for b in switched.buckets[0])


def test_state_dicts_load_both_ways_with_torchs_capturable_adam():
    """torch's capturable Adam keeps its step counts as float32 tensors too (on the
    parameters' device); a state dict of either loads into the other."""
    model = make_model(torch.float32, tiny=True)
    ours = fastmomentum.Adam(model.parameters(), lr=0.01, capturable=True)
    train(model, ours, 3, torch.float32)
    saved = ours.state_dict()
    assert saved["param_groups"][0]["capturable"] is True
    theirs = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=0.01)
    theirs.load_state_dict(saved)
    for key, value in theirs.state_dict()["state"][0].items():
        assert torch.equal(value, saved["state"][0][key])
    again = fastmomentum.Adam(copy.deepcopy(model).parameters(), lr=0.01)
    again.load_state_dict(theirs.state_dict())
    assert again.param_groups[0]["capturable"] is True
    assert float(again.state[next(iter(again.param_groups[0]["params"]))]["step"]) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stochastic_rounding": True}, "capturable=True with stochastic_rounding"),
        ({"state_dtype": "int8_blockwise"}, "capturable=True with state_dtype"),
        ({"step_in_backward": True}, "capturable=True with step_in_backward"),
    ],
)
def test_options_a_capturable_step_cannot_take_are_refused(options, message):
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match=message):
        fastmomentum.Adam(params, capturable=True, **options)


def test_cpu_parameters_are_refused(monkeypatch):
    """Without a GPU to read them, the counts cannot live on one: torch refuses too."""
    monkeypatch.setattr(config, "FORCE_CUDA", False)
    param = torch.nn.Parameter(torch.randn(3))
    before = param.detach().clone()
    with pytest.raises(ValueError, match="capturable=True steps parameters on a CUDA device"):
        fastmomentum.Adam([param], capturable=True)
    matrix = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="capturable=True steps parameters on a CUDA device"):
        fastmomentum.Muon([{"params": [matrix], "capturable": True}])
    assert torch.equal(param, before)


def test_an_optimizer_without_a_capturable_step_refuses_it():
    """Every optimizer here has one; a subclass that says it has none is refused."""
    without = type("WithoutCapture", (fastmomentum.Muon,), {"supports_capturable": False})
    matrix = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="does not support capturable=True"):
        without([{"params": [matrix], "capturable": True}])
