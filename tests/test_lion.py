"""Lion against a float64 NumPy reference (torch has none): the low-level step and the
optimizer, 16-bit parameters, ``sign(0)``, NaN and infinities, and what Lion refuses.

Lion moves each element by ``±lr`` (the sign of ``c = β1·m + (1 − β1)·g``), so where
``c`` lies within rounding of zero float32 and float64 may take opposite signs, and
parameters then differ by ``2·lr`` however exact the kernel is. The low-level tests
therefore compare each step with the reference taken from the arrays' values before
it, in ulps, and accept either sign only where ``|c|`` is below a bound on float32's
error in computing it (`_ambiguous`); the optimizer tests run a few steps in lockstep
with the reference, where no ``c`` comes that close to zero.
"""

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum.kernels import config, lion_step

from . import reference
from .assertions import RTOL, assert_relative_close

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 1001]
STEPS = 60
CASES = [
    {},
    {"weight_decay": 0.1},
    {"maximize": True, "betas": (0.8, 0.95), "weight_decay": 0.01},
    {"betas": (0.0, 0.5)},  # u = sign(g)
]
#: Bounds in ulps of each value's largest term, from its roundings in the dtype. The
#: parameter, of ``max(|p|, lr)``: ``1 − lr·λ`` and lr rounded (½ each), ``p·(1 − lr·λ)``
#: (½) and the difference (½ of a result up to twice as large: 1), 2.5 in all. exp_avg,
#: of ``max(|β2·m|, |(1 − β2)·g|)``: 1 − β2 rounded and each product (½ each, 1½), the
#: sum (1), 2.5; 3 with β2 rounded too. Measured (60 steps, every case): float32 at
#: most 2.0 ulps (parameter) and 2.1 (exp_avg); float64 0, bit for bit.
PARAM_ULPS, EXP_AVG_ULPS = 2.5, 3.0


def _options(case):
    return {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False, **case}


def _ambiguous(interpolation, m, grad, betas, dtype):
    """Where the sign of ``c`` may differ in ``dtype``: ``|c|`` under 4 ulps of the
    larger of its two terms (each product and the sum rounded once, and the
    coefficients rounded to ``dtype``)."""
    beta1 = betas[0]
    scale = np.maximum(np.abs(beta1 * m), np.abs((1 - beta1) * grad))
    return np.abs(interpolation) < 4 * np.finfo(dtype).eps * scale


def _ulps(actual, expected, scale, dtype):
    """|actual − expected| in units of ``dtype``'s spacing at ``scale``."""
    spacing = np.spacing(np.abs(scale).astype(dtype)).astype(np.float64)
    return np.abs(actual.astype(np.float64) - expected) / spacing


@pytest.mark.parametrize("threading", ["serial", "threaded"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_lion_step_matches_float64_reference(case, size, dtype, threading, monkeypatch):
    """Each step against the reference from the arrays' values before it (see above)."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    rng = np.random.default_rng(size + 19)
    param = rng.standard_normal(size).astype(dtype)
    exp_avg = np.zeros(size, dtype)
    options = _options(case)
    beta1, beta2 = options["betas"]
    ambiguous, worst = 0, [0.0, 0.0]
    for step in range(STEPS):
        grad = rng.standard_normal(size).astype(dtype)
        grad[::7] = 0  # sign(0) = 0 while m = 0; later m ≠ 0 decides
        options["lr"] = lr = 1e-2 * (1 + 0.5 * np.sin(step))  # a schedule
        wanted, wanted_m, interpolation = reference.lion(param, grad, exp_avg, **options)
        unsure = _ambiguous(interpolation, exp_avg, grad, options["betas"], dtype)
        param_scale = np.maximum(np.abs(param), lr)
        m_scale = np.maximum(np.abs(beta2 * exp_avg), np.abs((1 - beta2) * grad))
        lion_step(param, grad, exp_avg, **options)
        ambiguous += int(unsure.sum())
        other = wanted + 2 * lr * np.sign(interpolation)  # the other sign's parameter
        errors = _ulps(param, wanted, param_scale, dtype)
        errors = np.where(
            unsure, np.minimum(errors, _ulps(param, other, param_scale, dtype)), errors
        )
        m_errors = _ulps(exp_avg, wanted_m, m_scale, dtype)
        worst = [max(worst[0], errors.max(initial=0)), max(worst[1], m_errors.max(initial=0))]
    assert worst[0] <= PARAM_ULPS and worst[1] <= EXP_AVG_ULPS, worst
    assert ambiguous <= size * STEPS // 1000  # the exception, not the rule


def test_lion_step_runs_with_the_reference_over_many_steps_in_float64():
    """Lockstep, 200 steps: float64 takes the reference's sign everywhere."""
    rng = np.random.default_rng(23)
    param, exp_avg = rng.standard_normal(3001), np.zeros(3001)
    wanted, wanted_m = param.copy(), exp_avg.copy()
    options = _options({"weight_decay": 0.1})
    for _ in range(200):
        grad = rng.standard_normal(3001)
        lion_step(param, grad, exp_avg, **options)
        wanted, wanted_m, _ = reference.lion(wanted, grad, wanted_m, **options)
    assert_relative_close(param, wanted, RTOL["float64"], "param")
    assert_relative_close(exp_avg, wanted_m, RTOL["float64"], "exp_avg")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_of_zero_nan_and_infinity(dtype):
    """``sign(±0) = 0``: the element only decays; NaN propagates to parameter and
    momentum (torch's ``sign`` would give 0 here); ±inf moves by ∓lr."""
    param = np.array([1.0, -2.0, 3.0, 4.0, 5.0, 0.0], dtype)
    grad = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 0.0], dtype)
    exp_avg = np.zeros(6, dtype)
    lion_step(param, grad, exp_avg, lr=0.5, weight_decay=0.5)
    decayed = np.array([0.75, -1.5, np.nan, 3.0 - 0.5, 3.75 + 0.5, 0.0])
    np.testing.assert_array_equal(param, decayed.astype(dtype))
    np.testing.assert_array_equal(exp_avg, np.array([0, 0, np.nan, np.inf, -np.inf, 0], dtype))


def test_what_lion_step_refuses_leaves_the_arrays_unchanged():
    param, grad, exp_avg = np.ones(5, np.float32), np.ones(5, np.float32), np.zeros(5, np.float32)
    for options, error, message in [
        ({"lr": -1.0}, ValueError, "Invalid learning rate"),
        ({"betas": (1.0, 0.99)}, ValueError, "Invalid beta parameter at index 0"),
        ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value"),
        ({"lr": "0.1"}, TypeError, "lr must be a real number"),
        ({"maximize": "False"}, TypeError, "maximize must be a bool"),
    ]:
        with pytest.raises(error, match=message):
            lion_step(param, grad, exp_avg, **options)
    with pytest.raises(TypeError, match="exp_avg has dtype float64"):
        lion_step(param, grad, exp_avg.astype(np.float64))
    assert (param == 1).all() and not exp_avg.any()


# --- the optimizer -------------------------------------------------------------------

SHAPES = [(20, 30), (30,), (5, 3, 4), (7,)]
OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-3, "betas": (0.8, 0.95), "maximize": True},
    {},  # the defaults: lr 1e-4, betas (0.9, 0.99), no weight decay
]


def _params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in SHAPES]


def _gradients(params, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
        for _ in range(steps)
    ]


def _reference_run(values, gradients, options):
    settings = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False}
    settings |= options
    state = [(v.astype(np.float64), np.zeros(v.shape)) for v in values]
    for grads in gradients:
        state = [
            reference.lion(p, g.double().numpy(), m, **settings)[:2]
            for (p, m), g in zip(state, grads)
        ]
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=["decay", "betas-maximize", "defaults"])
def test_lion_trains_as_the_reference(options, dtype):
    params = _params(dtype)
    values = [p.detach().double().numpy().copy() for p in params]
    optimizer = fastmomentum.Lion(params, **options)
    gradients = _gradients(params, 10)
    for grads in gradients:
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
    tolerance = RTOL[str(dtype).removeprefix("torch.")]
    for param, (want, m) in zip(params, _reference_run(values, gradients, options)):
        assert_relative_close(param.detach().numpy(), want, tolerance, "param")
        assert_relative_close(optimizer.state[param]["exp_avg"].numpy(), m, tolerance, "exp_avg")
        assert list(optimizer.state[param]) == ["exp_avg"]  # no step count, as lion-pytorch


def _spacing(values, dtype):
    """The spacing of 16-bit ``dtype`` at float64 ``values`` (subnormals included)."""
    info = torch.finfo(dtype)
    return info.eps * np.exp2(np.floor(np.log2(np.maximum(np.abs(values), info.smallest_normal))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_parameters_are_the_float32_step_rounded_once(dtype):
    """Each step computes in float32 from the 16-bit values and rounds the parameter and
    exp_avg once: the reference's value from the same inputs rounded to nearest, except
    where that value lies within float32's error (4 float32 ulps of its largest term,
    as in `test_lion_step_matches_float64_reference`) of halfway between two 16-bit
    values, where either is right. The 16-bit inputs have few bits, so near-ties are
    frequent: in these runs (6970 values) 34 (float16) and 28 (bfloat16), of which 7 and
    6 rounded the other way."""
    params = _params(dtype)
    settings = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "maximize": False}
    optimizer = fastmomentum.Lion(params, **settings)
    beta2, float32_ulp = settings["betas"][1], float(np.finfo(np.float32).eps)
    for grads in _gradients(params, 5):
        starts = [
            (p.detach().double().numpy(), optimizer.state[p]["exp_avg"].double().numpy().copy())
            if optimizer.state[p] else (p.detach().double().numpy(), np.zeros(p.shape))
            for p in params
        ]  # fmt: skip
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        for param, grad, (value, m) in zip(params, grads, starts):
            g = grad.double().numpy()
            want, want_m, _ = reference.lion(value, g, m, **settings)
            scales = [np.maximum(np.abs(value), settings["lr"]),
                      np.maximum(np.abs(beta2 * m), np.abs((1 - beta2) * g))]  # fmt: skip
            ours = [param.detach(), optimizer.state[param]["exp_avg"]]
            for actual, wanted, scale in zip(ours, [want, want_m], scales):
                rounded = torch.from_numpy(wanted).to(dtype).double().numpy()
                actual = actual.double().numpy()
                half = _spacing(wanted, dtype) / 2
                tie = np.abs(np.abs(wanted - rounded) - half) <= 4 * float32_ulp * scale
                assert (actual[~tie] == rounded[~tie]).all()
                assert (np.abs(actual - wanted)[tie] <= half[tie] * (1 + 1e-6)).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1e-4}, "Invalid learning rate"),
        ({"betas": (1.0, 0.99)}, "Invalid beta parameter at index 0"),
        ({"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"lr": torch.tensor([1e-4, 1e-3])}, "must be 1-element"),
        ({"state_dtype": torch.float16}, "state_dtype must be None"),
        ({"kahan_sum": True}, "kahan_sum=True is for bfloat16"),
        ({"foreach": True, "fused": True}, "cannot be `True` together"),
    ],
    ids=["lr", "beta1", "beta2", "weight-decay", "tensor-lr", "float16-state", "kahan-float32",
         "foreach-fused"],
)  # fmt: skip
def test_what_lion_refuses(options, message):
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, RuntimeError), match=message):
        fastmomentum.Lion(params, **options)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_stochastic_rounding_counts_steps_lion_otherwise_has_none():
    """The random bits are keyed on a step count: with stochastic rounding Lion keeps
    one (``state[p]["step"]``), as SGD does; otherwise its state is ``exp_avg`` alone."""
    params = [p.detach().bfloat16().requires_grad_() for p in _params(torch.float32)]
    optimizer = fastmomentum.Lion(params, lr=1e-2, stochastic_rounding=True)
    for grads in _gradients(params, 3):
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
    for entry in optimizer.state_dict()["state"].values():
        assert set(entry) == {"step", "exp_avg"} and float(entry["step"]) == 3
