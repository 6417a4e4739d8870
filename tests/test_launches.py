"""Multi-tensor launches: one kernel over many arrays anywhere in memory.

The tables hold one huge, many tiny and some empty arrays, each a separate NumPy array
(so addresses are scattered), and are checked against the float64 references array by
array, on the CPU (threaded and single-threaded loops) and in the CUDA simulator.
"""

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum.kernels import config, cpu, rules
from fastmomentum.kernels.tables import TensorTable

from . import reference
from .assertions import RTOL, assert_relative_close, join_within
from .models import make_model, train

LENGTHS = [5000, 1, 0, 3, 17, 0, 64, 1, 999, 2]
STEPS = 5


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64])
def test_cpu_schedule_covers_every_element_once(parts):
    table = TensorTable(LENGTHS, 2, np.float32)
    segments, part_starts = table.cpu_schedule(parts)
    covered = [np.zeros(n, int) for n in LENGTHS]
    for entry, begin, end in segments.tolist():
        covered[entry][begin:end] += 1
    assert all((c == 1).all() for c in covered)
    sizes = [
        sum(end - begin for _, begin, end in segments[part_starts[p] : part_starts[p + 1]].tolist())
        for p in range(parts)
    ]
    assert max(sizes) - min(sizes) <= 1  # split by elements, not by tensor


def test_cuda_segments_cover_every_element_once():
    table = TensorTable(LENGTHS, 2, np.float32)
    covered = [np.zeros(n, int) for n in LENGTHS]
    segments = table.cuda_segments(16)
    for entry, begin, end, count, earliest in segments.tolist():
        assert end - begin <= 16
        assert count == (segments[:, 0] == entry).sum()  # the entry's segments
        assert earliest == (segments[:, 0] == entry).argmax()
        covered[entry][begin:end] += 1
    assert all((c == 1).all() for c in covered)


def make_arrays(dtype, count, seed):
    """``count`` arrays per entry (param, grad, state...): random, never zero."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(n).astype(dtype) for _ in range(count)] for n in LENGTHS]


def fill(table, arrays):
    for entry, row in enumerate(arrays):
        table.addresses[entry, : len(row)] = [a.ctypes.data for a in row]


def run_sgd(kernels, dtype):
    """SGD with momentum over the table for STEPS steps; returns (arrays, expected)."""
    arrays = make_arrays(dtype, 3, 0)
    expected = [[a.astype(np.float64) for a in row] for row in arrays]
    table = TensorTable(LENGTHS, 3, dtype, 1)
    fill(table, arrays)
    rng = np.random.default_rng(1)
    options = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    coefficients = rules.sgd.momentum_coefficients(dtype, 0.05, 0.9, 0.1, 0.01, False, "pytorch")
    for step in range(STEPS):
        first = rng.random(len(LENGTHS)) < 0.5 if step else np.ones(len(LENGTHS), bool)
        table.entry_values[:, 0] = first
        for row in arrays:
            row[1][:] = rng.standard_normal(row[1].size)
        kernels.launch(table, rules.sgd.MOMENTUM, coefficients, (False,))
        for row, want, is_first in zip(arrays, expected, first):
            want[0], want[2] = reference.sgd(
                want[0],
                row[1].astype(np.float64),
                want[2],
                nesterov=False,
                maximize=False,
                first_step=bool(is_first),
                **options,
            )
    return arrays, expected


def run_adam(kernels, dtype, amsgrad):
    arrays = make_arrays(dtype, 5, 2)
    for row in arrays:
        row[3][:] = np.abs(row[3])  # exp_avg_sq ≥ 0
        row[4][:] = np.abs(row[4])
    expected = [[a.astype(np.float64) for a in row] for row in arrays]
    table = TensorTable(LENGTHS, 5, dtype, 2)
    fill(table, [row if amsgrad else row[:4] for row in arrays])
    steps = np.arange(1, len(LENGTHS) + 1)  # every tensor at its own step count
    rng = np.random.default_rng(3)
    lr, betas, eps, weight_decay = 1e-2, (0.9, 0.99), 1e-8, 0.01
    coefficients = rules.adam.coefficients(dtype, lr, betas, eps, weight_decay, False, False)
    for _ in range(STEPS):
        steps += 1
        table.entry_values[:] = rules.adam.step_coefficients_per_entry(dtype, steps, lr, betas)
        for row in arrays:
            row[1][:] = rng.standard_normal(row[1].size)
        kernels.launch(table, rules.adam.SPEC, coefficients, (amsgrad,))
        for entry, (row, want) in enumerate(zip(arrays, expected)):
            want[0], want[2], want[3], want[4] = reference.adam(
                want[0],
                row[1].astype(np.float64),
                *want[2:],
                step=steps[entry],
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=False,
                decoupled=False,
            )
    return arrays, expected


def assert_tables_match(arrays, expected, dtype, skip=()):
    for entry, (row, want) in enumerate(zip(arrays, expected)):
        for column, (actual, wanted) in enumerate(zip(row, want)):
            if column != 1 and column not in skip:
                name = f"entry {entry} array {column}"
                assert_relative_close(actual, wanted, RTOL[np.dtype(dtype).name], name)


@pytest.fixture(params=["serial", "threaded"])
def cpu_loop(request, monkeypatch):
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if request.param == "serial" else 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_sgd_over_scattered_arrays(cpu_loop, dtype):
    assert_tables_match(*run_sgd(cpu, dtype), dtype)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_adam_over_scattered_arrays_with_own_step_counts(cpu_loop, dtype, amsgrad):
    arrays, expected = run_adam(cpu, dtype, amsgrad)
    assert_tables_match(arrays, expected, dtype, skip=() if amsgrad else (4,))
    if not amsgrad:  # its address was 0 and nothing read or wrote there
        assert all(np.array_equal(row[4], np.abs(row[4])) for row in arrays)


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_sgd_and_adam_over_the_same_tables(dtype, monkeypatch):
    kernels = pytest.importorskip("fastmomentum.kernels.cuda")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ITEMS_PER_THREAD", 4)  # segments of 32 elements
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    monkeypatch.setattr("tests.test_launches.LENGTHS", [100, 1, 0, 33, 7])
    assert_tables_match(*run_sgd(kernels, dtype), dtype)
    assert_tables_match(*run_adam(kernels, dtype, True), dtype)


@pytest.mark.parametrize("flat_gradients", [False, True])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_step_is_one_launch_per_bucket(name, flat_gradients, monkeypatch):
    """Autograd's fresh gradients (torch's default zero_grad) or our flat ones: one launch."""
    launches = []
    original = cpu.launch
    monkeypatch.setattr(
        cpu, "launch", lambda table, *args: (launches.append(table), original(table, *args))
    )
    model = make_model()
    options = {"lr": 0.01, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    optimizer = getattr(fastmomentum, name)(
        model.parameters(), flat_gradients=flat_gradients, **options
    )
    train(model, optimizer, 3, set_to_none=not flat_gradients)
    assert len(launches) == 3
    assert len(launches[-1]) == len(list(model.parameters()))
    if flat_gradients:
        assert all(
            bucket.gradients.all_ours() for buckets in optimizer.buckets for bucket in buckets
        )


def test_parameters_of_two_dtypes_are_two_launches(monkeypatch):
    launches = []
    original = cpu.launch
    monkeypatch.setattr(
        cpu, "launch", lambda table, *args: (launches.append(table), original(table, *args))
    )
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    optimizer = fastmomentum.Adam(model.parameters())
    model[1](model[0](torch.randn(5, 3)).double()).sum().backward()
    optimizer.step()
    assert sorted(t.dtype.name for t in launches) == ["float32", "float64"]


def _step_in_a_forked_child(result):
    param, grad = np.ones(1 << 16, np.float32), np.full(1 << 16, 0.5, np.float32)
    from fastmomentum.kernels import sgd_step

    sgd_step(param, grad, lr=0.1)
    result.value = float(param.sum())


def test_a_forked_child_steps_on_one_thread_instead_of_hanging():
    """GNU OpenMP is not fork-safe: a child of a process that ran threaded loops (ours
    or torch's) would hang or be killed in a threaded loop of its own."""
    import multiprocessing

    from fastmomentum.kernels import sgd_step

    torch.ones(1 << 20).add_(1)  # torch's thread pool, as in any training process
    sgd_step(np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32), lr=0.1)  # ours
    context = multiprocessing.get_context("fork")
    result = context.Value("d", 0.0)
    child = context.Process(target=_step_in_a_forked_child, args=(result,))
    child.start()
    join_within(child, 60, "the forked child")  # 0.7 s at load 10 on 2 cores, unless it hangs
    assert result.value == pytest.approx(0.95 * (1 << 16))
