"""The capability table (`fastmomentum.capabilities`) against the code, cell by cell.

Every combination a row claims constructs and takes two steps on random gradients (the
parameters move and stay finite; the numbers are the other suites'); every combination
of the matrix it does not claim is refused with a ``ValueError`` or ``TypeError``
before any parameter changes. The README shows the table's matrix, and the suites that
prove DDP, FSDP2, the CUDA simulator and the step in backward run every optimizer that
claims them.
"""

from pathlib import Path

import pytest
import torch

import fastmomentum
from fastmomentum.capabilities import (
    CAPABILITIES,
    PARAM_DTYPES,
    SIXTEEN_BIT_OPTIONS,
    STATE_DTYPES,
)
from fastmomentum.kernels import config

from . import distributed_run, fsdp_run
from .cases import CASES, OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]

#: The case each optimizer's cells are tried with: its first update rule, but one every
#: state format takes (centered RMSprop has no 8-bit state).
CASE = {name: info.rules[0] for name, info in OPTIMIZERS.items()} | {"RMSprop": "rmsprop-momentum"}

REFUSED = (ValueError, TypeError)


def options_of(name):
    case_name, options = CASES[CASE[name]]
    assert case_name == name
    return dict(options)


def params_of(dtype, name):
    generator = torch.Generator().manual_seed(0)
    shape = OPTIMIZERS[name].shape  # 2-D for an optimizer of matrices only
    return [
        torch.nn.Parameter(torch.randn(shape((3, 100)), generator=generator).to(dtype)),
        torch.nn.Parameter(torch.randn(shape((37,)), generator=generator).to(dtype)),
    ]


def steps_or_refuses(name, dtype, claimed, **options):
    """Two steps of ``name`` on parameters of ``dtype`` with ``options`` if ``claimed``,
    else a refusal at construction or at the step, with the parameters unchanged."""
    params = params_of(dtype, name)
    before = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(1)
    try:
        optimizer = getattr(fastmomentum, name)(params, **options_of(name), **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            optimizer.step()
    except REFUSED as error:
        assert not claimed, f"{name} {dtype} {options}: claimed, but refused: {error}"
        for p, old in zip(params, before):
            assert torch.equal(p.detach(), old), f"{name} {options}: refused after a change"
        return
    assert claimed, f"{name} {dtype} {options}: not claimed, but it steps"
    for p, old in zip(params, before):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), old)


def test_the_table_has_every_optimizer_and_only_those():
    assert list(CAPABILITIES) == list(OPTIMIZERS)
    for name in CAPABILITIES:
        assert getattr(fastmomentum, name)
    for row in CAPABILITIES.values():
        assert set(row.param_dtypes) <= set(PARAM_DTYPES)
        assert set(row.state_dtypes) <= set(STATE_DTYPES) and "param" in row.state_dtypes
        assert set(row.sixteen_bit_options) <= set(SIXTEEN_BIT_OPTIONS)


@pytest.mark.parametrize("name", list(CAPABILITIES))
@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_parameter_dtypes(name, dtype):
    steps_or_refuses(name, getattr(torch, dtype), dtype in CAPABILITIES[name].param_dtypes)


@pytest.mark.parametrize("name", list(CAPABILITIES))
@pytest.mark.parametrize("state", ["bfloat16", "int8_blockwise"])
def test_state_dtypes_of_float32_parameters(name, state):
    state_dtype = torch.bfloat16 if state == "bfloat16" else state
    claimed = state in CAPABILITIES[name].state_dtypes
    steps_or_refuses(name, torch.float32, claimed, state_dtype=state_dtype)


@pytest.mark.parametrize("name", list(CAPABILITIES))
def test_8_bit_state_of_16_bit_parameters(name):
    row = CAPABILITIES[name]
    claimed = "bfloat16" in row.param_dtypes and "int8_blockwise" in row.state_dtypes
    steps_or_refuses(name, torch.bfloat16, claimed, state_dtype="int8_blockwise")


@pytest.mark.parametrize("name", list(CAPABILITIES))
@pytest.mark.parametrize("option", SIXTEEN_BIT_OPTIONS)
def test_16_bit_options(name, option):
    claimed = option in CAPABILITIES[name].sixteen_bit_options
    steps_or_refuses(name, torch.bfloat16, claimed, **{option: True})


@pytest.mark.parametrize("option", ["stochastic_rounding", "kahan_sum"])
def test_rounding_options_are_refused_for_float32_parameters(option):
    for name in CAPABILITIES:
        steps_or_refuses(name, torch.float32, False, **{option: True})


@pytest.mark.parametrize("name", list(CAPABILITIES))
def test_step_in_backward(name):
    params = params_of(torch.float32, name)
    before = [p.detach().clone() for p in params]
    cls = getattr(fastmomentum, name)
    if not CAPABILITIES[name].step_in_backward:
        with pytest.raises(REFUSED):
            cls(params, step_in_backward=True, **options_of(name))
        return
    optimizer = cls(params, step_in_backward=True, **options_of(name))
    for _ in range(2):
        sum((p * p.detach().sin()).sum() for p in params).backward()
        assert all(p.grad is None for p in params)  # stepped and freed inside backward
    assert optimizer.steps_in_backward
    for p, old in zip(params, before):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), old)


@pytest.mark.cudasim
@pytest.mark.parametrize("name", list(CAPABILITIES))
def test_capturable(name, monkeypatch):
    """``capturable=True`` on CUDA tensors: the simulator's (``config.FORCE_CUDA``)."""
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    steps_or_refuses(name, torch.float32, CAPABILITIES[name].capturable, capturable=True)


def test_the_distributed_suites_run_every_optimizer_that_claims_them():
    ddp = {name for _, name, *_ in distributed_run.CASES}
    fsdp = {name for _, name, _ in fsdp_run.CASES}
    assert ddp == {name for name, row in CAPABILITIES.items() if row.ddp}
    assert fsdp == {name for name, row in CAPABILITIES.items() if row.fsdp2}


def test_the_simulator_suite_runs_every_optimizer():
    # tests/test_cuda.py's `every_optimizer` suite runs each row of tests/cases.OPTIMIZERS
    assert all(row.cuda for row in CAPABILITIES.values())
    assert list(CAPABILITIES) == list(OPTIMIZERS)


def test_the_text_derived_from_the_registries_is_current():
    """The README's support matrix and the imports type checkers read in
    ``fastmomentum/__init__.py`` and ``kernels/__init__.py`` are the registries'."""
    from fastmomentum import derived

    regions = derived.regions()
    assert {path.name for path, _ in regions} == {"__init__.py", "README.md"}
    for path, text in regions:
        assert derived.current(path) == text, (
            f"{path} is not what the registries say: run python -m fastmomentum.derived"
        )
