"""Stochastic rounding (``stochastic_rounding=True``) and Kahan-compensated summation
(``kahan_sum=True``) for 16-bit parameters.

The rounding functions are checked on their own (distribution, edges, the compiled
versions against the Python ones the CUDA simulator runs), then through the optimizers:
CPU loops against the CUDA simulator's kernels, the ordinary step against the step in
backward, a resume against an unbroken run, state dicts both ways with torch.optim, and
a training run where bfloat16 alone stalls.
"""

import copy

import numpy as np
import pytest
import torch
from numba import njit

import fastmomentum
from fastmomentum.kernels import config, precision
from fastmomentum.kernels.tables import random_keys

from .cases import OPTIMIZERS, every_optimizer
from .test_step_in_backward import assert_same, small_buckets, train  # noqa: F401

SAMPLES = 100_000
#: Five standard deviations of a fraction of SAMPLES Bernoulli draws (p(1 − p) ≤ 1/4):
#: a correct rounding fails a check with probability below 1e-6.
BOUND = 5 * 0.5 / np.sqrt(SAMPLES)

SIXTEEN_BIT = lambda info: info.steps(torch.bfloat16)  # noqa: E731
ROUNDINGS = [
    pytest.param({"stochastic_rounding": True, "rounding_seed": 7}, id="stochastic"),
    pytest.param({"kahan_sum": True}, id="kahan"),
]


@njit
def _stored(values, out, key):
    """The compiled CPU path: each value stored stochastically with element i's bits."""
    for i in range(values.size):
        precision.store_stochastically(out, i, values[i], precision.random_bits(key, i))


@njit
def _bits(key, count):
    out = np.empty(count, np.uint32)
    for i in range(count):
        out[i] = precision.random_bits(key, i)
    return out


def compiled(values, carrier, key=12345):
    out = np.zeros(len(values), carrier)
    _stored(np.asarray(values, np.float32), out, key)
    return out


def simulated(values, carrier, key=12345):
    """The Python path (what the CUDA simulator runs)."""
    out = np.zeros(len(values), carrier)
    for i, value in enumerate(np.asarray(values, np.float32)):
        precision.store_stochastically(out, i, value, precision.random_bits(key, i))
    return out


def as_float(bits, carrier):
    if carrier == precision.BFLOAT16_BITS:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def neighbours(value, dtype):
    """The two ``dtype`` values around float32 ``value``: toward zero, then away."""
    value = np.float32(value)
    if dtype == torch.bfloat16:
        word = np.asarray(value).view(np.uint32) & np.uint32(0xFFFF0000)
        return float(word.view(np.float32)), float((word + np.uint32(0x10000)).view(np.float32))
    nearest = np.float16(value)
    toward_zero = nearest if abs(nearest) <= abs(value) else np.nextafter(nearest, np.float16(0))
    away = np.nextafter(toward_zero, np.float16(np.copysign(np.inf, value)))
    return float(toward_zero), float(away)


def test_random_bits_compiled_equal_python_and_look_uniform():
    key = 0xDEADBEEF
    bits = _bits(key, SAMPLES)
    assert [int(precision.random_bits(key, i)) for i in range(2000)] == bits[:2000].tolist()
    for shift in (0, 16, 28):  # low, middle and top bits: each fraction of ones ≈ 1/2
        ones = ((bits >> np.uint32(shift)) & np.uint32(1)).mean()
        assert abs(ones - 0.5) < BOUND
    assert len(np.unique(bits)) > 0.99 * SAMPLES  # 2³² values: few repeats in 1e5


@pytest.mark.parametrize(
    ("carrier", "dtype", "magnitudes"),
    [
        (precision.BFLOAT16_BITS, torch.bfloat16, [1.0, 3e-3, 7e5, 1e-39]),  # 1e-39: subnormal
        (precision.FLOAT16_BITS, torch.float16, [1.0, 3e-3, 3e4, 3e-6, 2e-8]),  # last two:
    ],  # float16 subnormals (below 2⁻¹⁴), 2e-8 below the smallest one (6e-8)
    ids=["bfloat16", "float16"],
)
def test_rounds_up_with_the_probability_of_the_fraction(carrier, dtype, magnitudes):
    """For random values between two neighbours, the fraction of 1e5 stores that round
    up is within 5σ of where the value lies between them, and the mean stored value is
    the value itself (unbiased); the Python path gives the same bits as the compiled."""
    rng = np.random.default_rng(0)
    for magnitude in magnitudes:
        for sign in (1, -1):
            value = np.float32(sign * magnitude * rng.uniform(1, 1.5))
            low, high = neighbours(value, dtype)
            assert low != high, value  # not representable: something to round
            stored = as_float(compiled(np.full(SAMPLES, value), carrier), carrier)
            assert set(stored.tolist()) <= {low, high}
            fraction = (float(value) - low) / (high - low)
            assert abs((stored == high).mean() - fraction) < BOUND, (value, fraction)
            head = np.full(500, value)
            assert np.array_equal(simulated(head, carrier), compiled(head, carrier))


@pytest.mark.parametrize(
    ("carrier", "dtype"),
    [(precision.BFLOAT16_BITS, torch.bfloat16), (precision.FLOAT16_BITS, torch.float16)],
    ids=["bfloat16", "float16"],
)
def test_edges(carrier, dtype):
    """NaN stays NaN, ±inf stays ±inf, values already representable never move, a
    value past the largest finite one rounds to inf with the probability of its
    fraction, float32 subnormals and values far below the format's range go to a zero
    of their sign (below one chance in 2³² to round up); compiled == Python."""
    info = torch.finfo(dtype)
    representable = torch.randn(64).to(dtype).float().numpy()
    edges = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.max, -info.max, info.tiny]
    values = np.concatenate([np.float32(edges), representable, np.float32([1e-45, -1e-45])])
    for key in (0, 1, 2**32 - 1):
        out = compiled(values, carrier, key)
        assert np.array_equal(out, simulated(values, carrier, key))
        stored = as_float(out, carrier)
        assert np.isnan(stored[:2]).all()
        np.testing.assert_array_equal(stored[2:-2], np.float32(edges[2:] + list(representable)))
        assert np.signbit(stored[5]) and not np.signbit(stored[4])
        assert stored[-2] == 0 and not np.signbit(stored[-2]) and np.signbit(stored[-1])
    # halfway from the largest finite value to the next power of two (its next value
    # were the exponent not saturated): inf half the time
    step = info.eps * 2.0 ** np.floor(np.log2(info.max))  # between the largest two
    beyond = np.float32(info.max + step / 2)
    stored = as_float(compiled(np.full(SAMPLES, beyond), carrier), carrier)
    assert set(stored.tolist()) <= {float(info.max), np.inf}
    assert abs(np.isinf(stored).mean() - 0.5) < BOUND


def test_random_keys_are_32_bits_and_differ_by_parameter_and_step():
    keys = random_keys(3, np.arange(4), np.array([1, 1, 2, 2]))
    assert keys.dtype == np.int64 and (keys >= 0).all() and (keys < 2**32).all()
    assert len(set(keys.tolist())) == 4
    assert random_keys(3, [5], [9]) == random_keys(3, [5], [9])
    assert random_keys(3, [5], [9]) != random_keys(4, [5], [9])


# --- through the optimizers -----------------------------------------------------------


def bfloat16_twins(name, options, rounding, dtype=torch.bfloat16, in_backward=(True, False)):
    from .models import make_model

    model = make_model(dtype)
    ref_model = copy.deepcopy(model)
    cls = OPTIMIZERS[name].cls
    first = cls(model.parameters(), step_in_backward=in_backward[0], **options, **rounding)
    second = cls(ref_model.parameters(), step_in_backward=in_backward[1], **options, **rounding)
    return model, first, ref_model, second


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@every_optimizer(SIXTEEN_BIT)
def test_step_in_backward_is_bit_identical(name, options, rounding, dtype):
    """Buckets of the step in backward differ from the ordinary ones; the numbers not."""
    if options.get("centered"):  # float16 state: see test_step_in_backward
        options = {**options, "centered": False}
    model, ours, ref_model, theirs = bfloat16_twins(name, options, rounding, dtype)
    train(model, ours, 5, True)
    train(ref_model, theirs, 5, False)
    assert len(ours.buckets[0]) > 3
    assert_same(model, ours, ref_model, theirs)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("state_dtype", [None, "int8_blockwise"], ids=["bf16-state", "int8"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@every_optimizer(SIXTEEN_BIT)
def test_with_every_state_dtype(name, options, rounding, state_dtype):
    if state_dtype and not OPTIMIZERS[name].supports_quantized_state:
        pytest.skip("no 8-bit state")
    if state_dtype and options.get("centered"):
        options = {**options, "centered": False}
    options = {**options, "state_dtype": state_dtype}
    model, ours, ref_model, theirs = bfloat16_twins(name, options, rounding)
    train(model, ours, 4, True)
    train(ref_model, theirs, 4, False)
    assert_same(model, ours, ref_model, theirs)


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", ["SGD", "AdamW", "LAMB"])
def test_cuda_kernels_give_the_cpu_loops_bits(monkeypatch, name, rounding, dtype):
    """The CUDA kernels (in the simulator, on CPU tensors) against the CPU loops: the
    same random bits and the same rounding. The float32 arithmetic before the rounding
    may differ by an ulp (fused multiply-adds), which can move a 16-bit value by one
    step where it lies near a boundary: at most 1% of the elements may differ, by
    one 16-bit step, and the step count and compensations agree as closely."""
    pytest.importorskip("numba.cuda")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    options = {"SGD": {"lr": 0.05, "momentum": 0.9}, "LAMB": {"lr": 1e-2, "weight_decay": 0.01}}
    options = options.get(name, {"lr": 1e-2})
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    model, ours, ref_model, theirs = bfloat16_twins(name, options, rounding, dtype, (False,) * 2)
    monkeypatch.setattr(config, "FORCE_CUDA", False)
    train(ref_model, theirs, 3, False)
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    assert all(type(b.kernels).__name__ == "TorchStreamKernels" for b in ours.buckets[0])
    train(model, ours, 3, False)
    differing, total = 0, 0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        apart = (p.float() - q.float()).abs()
        step = torch.maximum(p.float().abs(), q.float().abs()) * torch.finfo(dtype).eps * 2
        assert (apart <= step + torch.finfo(dtype).tiny).all()
        differing, total = differing + int((apart > 0).sum()), total + p.numel()
    assert differing <= 0.01 * total, (differing, total)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@every_optimizer(SIXTEEN_BIT)
def test_resume_is_bit_identical(name, options, rounding):
    """A run resumed from a state dict (into an optimizer made with another seed: the
    checkpoint's wins) matches the unbroken run bit for bit."""
    from .models import make_model

    model, ours, _, _ = bfloat16_twins(name, options, rounding)
    train(model, ours, 3, False)
    checkpoint = copy.deepcopy((model.state_dict(), ours.state_dict()))
    train(model, ours, 6, False, first=3)
    resumed_model = make_model(torch.bfloat16, seed=5)
    resumed_model.load_state_dict(checkpoint[0])
    other = {**rounding, "rounding_seed": 99} if "rounding_seed" in rounding else rounding
    resumed = OPTIMIZERS[name].cls(resumed_model.parameters(), **options, **other)
    resumed.load_state_dict(checkpoint[1])
    train(resumed_model, resumed, 6, False, first=3)
    assert_same(model, ours, resumed_model, resumed)


def test_plain_sgd_counts_its_steps_for_the_random_bits():
    """SGD without momentum keeps no state in torch; with stochastic rounding its step
    count is its state, so that a resume is exact."""
    model, ours, _, _ = bfloat16_twins("SGD", {"lr": 0.05}, {"stochastic_rounding": True})
    train(model, ours, 2, False)
    assert all(set(entry) == {"step"} for entry in ours.state_dict()["state"].values())
    assert all(float(entry["step"]) == 2 for entry in ours.state_dict()["state"].values())


def test_seed_lives_in_the_param_groups():
    params = [torch.nn.Parameter(torch.randn(5).bfloat16())]
    torch.manual_seed(3)
    first = fastmomentum.AdamW(params, stochastic_rounding=True)
    torch.manual_seed(3)
    second = fastmomentum.AdamW(params, stochastic_rounding=True)
    seed = first.param_groups[0]["rounding_seed"]
    assert seed == second.param_groups[0]["rounding_seed"]  # from torch's generator
    assert (
        fastmomentum.AdamW(params, stochastic_rounding=True, rounding_seed=11).param_groups[0][
            "rounding_seed"
        ]
        == 11
    )
    assert "rounding_seed" not in fastmomentum.AdamW(params).param_groups[0]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_checkpoints_both_ways_with_torch_optim(rounding):
    """torch.optim.AdamW loads our checkpoint (it keeps ``rounding_seed`` in its param
    groups and ``kahan_comp`` in its state, unused, and saves them back), and we load
    its (no seed: the constructor's; no compensation: zero)."""
    from .models import make_model

    model = make_model(torch.bfloat16)
    ours = fastmomentum.AdamW(model.parameters(), lr=1e-2, **rounding)
    train(model, ours, 2, False)
    saved = ours.state_dict()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    theirs.load_state_dict(saved)
    if "rounding_seed" in rounding:
        assert theirs.param_groups[0]["rounding_seed"] == 7
    else:
        assert all("kahan_comp" in entry for entry in theirs.state.values())
    train(model, theirs, 3, False, first=2)
    again = fastmomentum.AdamW(model.parameters(), lr=1e-2, **rounding)
    again.load_state_dict(theirs.state_dict())
    for key, entry in theirs.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(again.state_dict()["state"][key][name], value), name
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    train(model, plain, 1, False)
    again.load_state_dict(plain.state_dict())  # no seed, no compensation
    train(model, again, 2, False, first=1)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    ("dtype", "options", "match"),
    [
        (torch.float32, {"stochastic_rounding": True}, "bfloat16 and float16 parameters"),
        (torch.float64, {"kahan_sum": True}, "bfloat16 and float16 parameters"),
        (torch.bfloat16, {"kahan_sum": True, "stochastic_rounding": True}, "choose one"),
        (torch.bfloat16, {"kahan_sum": True, "master_weights": True}, "choose one"),
        (torch.float16, {"stochastic_rounding": True, "master_weights": True}, "choose one"),
        (torch.bfloat16, {"rounding_seed": 3}, "seed of stochastic_rounding"),
        (torch.bfloat16, {"stochastic_rounding": True, "rounding_seed": -1}, "2\\*\\*64"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(dtype, options, match):
    param = torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    before = param.detach().clone()
    with pytest.raises(ValueError, match=match):
        fastmomentum.AdamW([param], **options)
    assert torch.equal(param, before) and param.grad is None


def test_a_group_added_later_is_checked():
    ours = fastmomentum.SGD([torch.nn.Parameter(torch.randn(3).bfloat16())], kahan_sum=True)
    with pytest.raises(ValueError, match="kahan_sum=True is for bfloat16"):
        ours.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert len(ours.param_groups) == 1


# --- what it is for -------------------------------------------------------------------


def teacher_student(dtype, options, steps=300, lr=1e-4, name="AdamW"):
    """Held-out loss of a linear student fitted to a linear teacher's noisy outputs by
    ``name`` (AdamW) at a small learning rate, the student's parameters in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 16, generator=generator) / 8
    inputs = torch.randn(4096, 64, generator=generator)
    targets = inputs @ teacher + 0.01 * torch.randn(4096, 16, generator=generator)
    start = teacher + 0.05 * torch.randn(64, 16, generator=generator)
    weight = torch.nn.Parameter(start.to(dtype))
    optimizer = getattr(fastmomentum, name)([weight], lr=lr, weight_decay=0.0, **options)
    for step in range(steps):
        batch = slice((step * 64) % 3584, (step * 64) % 3584 + 64)
        loss = torch.nn.functional.mse_loss(inputs[batch] @ weight.float(), targets[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(inputs[3584:] @ weight.float(), targets[3584:]))


@pytest.mark.parametrize(("name", "lr"), [("AdamW", 1e-4), ("LAMB", 3e-4)], ids=["adamw", "lamb"])
def test_bfloat16_with_either_option_tracks_float32_where_bfloat16_alone_stalls(name, lr):
    """At lr 1e-4 most AdamW updates are below half a bfloat16 step and round away:
    bfloat16 alone stalls far above float32's loss; stochastic rounding and Kahan
    summation end within 2% of it (measured: float32 8.628e-2, bfloat16 alone
    1.634e-1 (+89%), stochastic 8.707e-2 (+0.9%), Kahan 8.620e-2 (−0.1%)). LAMB moves
    the weight by lr·‖p‖ a step (all its elements about 1e-4 of ‖p‖ apart): at lr 3e-4
    (measured: float32 1.064e-1, bfloat16 alone 1.684e-1 (+58%), stochastic +0.3%,
    Kahan −0.1%); at 1e-3 the float32 loss falls to 1.6e-2, where bfloat16's own
    resolution costs stochastic rounding +3% (Kahan −0.6%, bfloat16 alone +723%)."""
    reference = teacher_student(torch.float32, {}, lr=lr, name=name)
    alone = teacher_student(torch.bfloat16, {}, lr=lr, name=name)
    stochastic = teacher_student(
        torch.bfloat16, {"stochastic_rounding": True, "rounding_seed": 1}, lr=lr, name=name
    )
    kahan = teacher_student(torch.bfloat16, {"kahan_sum": True}, lr=lr, name=name)
    print(f"float32 {reference:.3e} bf16 {alone:.3e} stochastic {stochastic:.3e} kahan {kahan:.3e}")
    assert alone > 1.5 * reference
    assert abs(stochastic / reference - 1) < 0.02
    assert abs(kahan / reference - 1) < 0.02
