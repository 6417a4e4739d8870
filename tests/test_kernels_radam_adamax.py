"""The low-level RAdam and Adamax steps on NumPy arrays against the float64 references
(as tests/test_kernels.py checks the others)."""

import numpy as np
import pytest

from fastmomentum.kernels import config, rules

from . import reference
from .assertions import RTOL, assert_relative_close
from .cases import learning_rate

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 1001]  # empty, scalar-like, odd and larger than a thread's chunk
STEPS = 60


@pytest.fixture(autouse=True, params=["serial", "threaded"])
def cpu_loop(request, monkeypatch):
    """Every CPU test runs both loops: single-threaded (short arrays) and threaded."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if request.param == "serial" else 0)


RADAM_CASES = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "betas": (0.8, 0.95), "eps": 1e-6},
    {
        "betas": (0.3, 0.6)
    },  # 1 − β1 ≥ 0.5: the other branch of torch's lerp; ρ_∞ = 4: never rectified
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", RADAM_CASES)
def test_radam_step_matches_float64_reference(dtype, size, case):
    from fastmomentum.kernels import radam_step

    rng = np.random.default_rng(size + 17)
    param = rng.standard_normal(size).astype(dtype)
    moments = [np.zeros(size, dtype), np.zeros(size, dtype)]
    expected = [param.astype(np.float64), np.zeros(size), np.zeros(size)]
    options = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
    options |= case
    decoupled = options.pop("decoupled_weight_decay", False)
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        radam_step(param, grad, *moments, step=step, lr=lr, decoupled_weight_decay=decoupled,
                   **options)  # fmt: skip
        expected = reference.radam(
            *expected[:1], grad.astype(np.float64), *expected[1:], step=step, lr=lr,
            decoupled=decoupled, **options,
        )  # fmt: skip
    tolerance = RTOL[np.dtype(dtype).name]
    for name, actual, wanted in zip(
        ["param", "exp_avg", "exp_avg_sq"], [param, *moments], expected
    ):
        assert_relative_close(actual, wanted, tolerance, name)


def test_radam_switches_to_the_rectified_step_where_torch_does():
    """ρ_t > 5 from step 6 with torch's default betas (ρ_5 ≈ 4.99), never when ρ_∞ ≤ 5."""
    rectified = [rules.radam.step_values([t], 1e-3, (0.9, 0.999))[0][-1] for t in range(1, 9)]
    assert rectified == [0, 0, 0, 0, 0, 1, 1, 1]
    assert not rules.radam.step_values(np.arange(1, 100), 1e-3, (0.3, 0.6))[:, -1].any()
    rows = rules.radam.step_values([3, 7, 3], 1e-3, (0.9, 0.999))  # a row per parameter
    np.testing.assert_array_equal(rows[0], rows[2])
    assert rows[1][-1] == 1 and rows[0][-1] == 0


ADAMAX_CASES = [
    {},
    {"weight_decay": 0.1, "maximize": True},
    {"betas": (0.3, 0.6), "eps": 1e-3},  # 1 − β1 ≥ 0.5: the other branch of torch's lerp
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", ADAMAX_CASES)
def test_adamax_step_matches_float64_reference(dtype, size, case):
    from fastmomentum.kernels import adamax_step

    rng = np.random.default_rng(size + 19)
    param = rng.standard_normal(size).astype(dtype)
    state = [np.zeros(size, dtype), np.zeros(size, dtype)]  # exp_avg, exp_inf
    expected = [param.astype(np.float64), np.zeros(size), np.zeros(size)]
    options = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
    options |= case
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        adamax_step(param, grad, *state, step=step, lr=lr, **options)
        expected = reference.adamax(
            *expected[:1], grad.astype(np.float64), *expected[1:], step=step, lr=lr, **options
        )
    tolerance = RTOL[np.dtype(dtype).name]
    for name, actual, wanted in zip(["param", "exp_avg", "exp_inf"], [param, *state], expected):
        assert_relative_close(actual, wanted, tolerance, name)


def test_adamax_keeps_nan_in_its_infinity_norm_as_torch_maximum_does():
    from fastmomentum.kernels import adamax_step

    param, exp_avg = np.ones(3, np.float32), np.zeros(3, np.float32)
    exp_inf = np.array([np.nan, 1.0, 1.0], np.float32)
    grad = np.array([1.0, np.nan, 1.0], np.float32)
    adamax_step(param, grad, exp_avg, exp_inf, step=1)
    assert np.isnan(exp_inf[:2]).all()
    assert exp_inf[2] == np.float32(1) + np.float32(1e-8)  # |g| + ε over β2·u
