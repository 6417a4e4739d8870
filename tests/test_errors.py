"""Bad input to the torch optimizers: a clear error, raised before any value changes."""

import copy

import pytest
import torch
from torch import nn

import fastmomentum

from .cases import EVERY_RULE, torch_cases
from .models import make_model


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("SGD", {"lr": -0.1}, "Invalid learning rate"),
        ("SGD", {"lr": 0.1, "momentum": -0.9}, "Invalid momentum value"),
        ("SGD", {"lr": 0.1, "weight_decay": -1e-4}, "Invalid weight_decay value"),
        ("SGD", {"lr": 0.1, "nesterov": True}, "Nesterov momentum requires"),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov"),
        ("Adam", {"lr": -1e-3}, "Invalid learning rate"),
        ("Adam", {"eps": -1.0}, "Invalid epsilon value"),
        ("Adam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        ("Adam", {"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
        ("AdamW", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("NAdam", {"lr": -1e-3}, "Invalid learning rate"),
        ("NAdam", {"eps": -1.0}, "Invalid epsilon value"),
        ("NAdam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        ("NAdam", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
        ("NAdam", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("NAdam", {"momentum_decay": -1e-3}, "Invalid momentum_decay value"),
        ("RAdam", {"lr": -1e-3}, "Invalid learning rate"),
        ("RAdam", {"eps": -1.0}, "Invalid epsilon value"),
        ("RAdam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        ("RAdam", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
        ("RAdam", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("Adamax", {"lr": -1e-3}, "Invalid learning rate"),
        ("Adamax", {"eps": -1.0}, "Invalid epsilon value"),
        ("Adamax", {"betas": (-0.1, 0.999)}, "Invalid beta parameter at index 0"),
        ("Adamax", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
        ("Adamax", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("RMSprop", {"lr": -1e-3}, "Invalid learning rate"),
        ("RMSprop", {"eps": -1.0}, "Invalid epsilon value"),
        ("RMSprop", {"momentum": -0.5}, "Invalid momentum value"),
        ("RMSprop", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("RMSprop", {"alpha": -0.9}, "Invalid alpha value"),
        ("Adagrad", {"lr": -1e-3}, "Invalid learning rate"),
        ("Adagrad", {"lr_decay": -0.1}, "Invalid lr_decay value"),
        ("Adagrad", {"weight_decay": -0.1}, "Invalid weight_decay value"),
        ("Adagrad", {"initial_accumulator_value": -1.0}, "Invalid initial_accumulator_value"),
        ("Adagrad", {"eps": -1.0}, "Invalid epsilon value"),
    ],
)
def test_invalid_hyperparameters_raise_like_torch(name, options, message):
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=message):
        getattr(torch.optim, name)(params, **options)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=message):
        getattr(fastmomentum, name)(params, **options)
    assert torch.equal(params[0], before)


def test_momentum_convention_must_be_known():
    with pytest.raises(ValueError, match="momentum_convention"):
        fastmomentum.SGD([nn.Parameter(torch.randn(3))], lr=0.1, momentum_convention="keras")


@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        ("SGD", {"foreach": True, "fused": True}, RuntimeError, "cannot be `True` together"),
        ("SGD", {"differentiable": True}, ValueError, "differentiable=True"),
        ("Adam", {"capturable": True}, ValueError, "capturable=True"),
        ("AdamW", {"differentiable": True}, ValueError, "differentiable=True"),
        ("NAdam", {"capturable": True}, ValueError, "capturable=True"),
        ("NAdam", {"differentiable": True}, ValueError, "differentiable=True"),
        ("RAdam", {"capturable": True}, ValueError, "capturable=True"),
        ("RAdam", {"differentiable": True}, ValueError, "differentiable=True"),
        ("Adamax", {"capturable": True}, ValueError, "capturable=True"),
        ("Adamax", {"differentiable": True}, ValueError, "differentiable=True"),
        ("RMSprop", {"capturable": True}, ValueError, "capturable=True"),
        ("SGD", {"capturable": True}, ValueError, "capturable=True"),
        ("Adagrad", {"capturable": True}, ValueError, "capturable=True"),
        ("Lion", {"capturable": True}, ValueError, "capturable=True"),
        ("LAMB", {"capturable": True}, ValueError, "capturable=True"),
    ],
)
def test_implementation_options_we_cannot_honour(name, options, error, message):
    with pytest.raises(error, match=message):
        getattr(fastmomentum, name)([nn.Parameter(torch.randn(3))], **options)


@pytest.mark.parametrize(
    "options", [{"foreach": True}, {"foreach": False}, {"fused": True}, {"fused": False}]
)
def test_implementation_hints_are_accepted(options):
    """``foreach`` and ``fused`` change nothing but the implementation: we step as
    torch.optim does with the same hint."""
    param = nn.Parameter(torch.randn(3))
    start = param.detach().clone()
    twin = nn.Parameter(start.clone())
    ours = fastmomentum.Adam([param], lr=0.1, **options)
    theirs = torch.optim.Adam([twin], lr=0.1, **options)
    for step in range(3):
        param.grad = torch.full((3,), step + 0.5)
        twin.grad = param.grad.clone()
        ours.step()
        theirs.step()
    assert not torch.equal(param.detach(), start)
    torch.testing.assert_close(param, twin, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: [nn.Parameter(torch.randn(3, dtype=torch.complex64))], TypeError, "complex"),
        (lambda: [nn.Parameter(torch.randn(3).to(torch.float8_e4m3fn))], TypeError, "float8"),
        (lambda: [nn.Parameter(torch.randn(3).to_sparse())], TypeError, "layout"),
    ],
)
def test_unsupported_params_are_rejected_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        fastmomentum.SGD(make(), lr=0.1)


@torch_cases(*EVERY_RULE)
def test_sparse_gradient_fails_the_step_before_any_update(name, options):
    """As torch's fused steps: constructed, then a ``RuntimeError`` at the step (ours
    before any update, and naming what to use instead)."""
    torch.manual_seed(0)
    dense, sparse = nn.Linear(3, 3), nn.Embedding(10, 3, sparse=True)
    dense(sparse(torch.tensor([1, 2]))).sum().backward()
    assert sparse.weight.grad.is_sparse
    params = [*dense.parameters(), *sparse.parameters()]
    optimizer = getattr(fastmomentum, name)(params, **options)
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match="parameter 2 of param group 0 has a sparse gradient"):
        optimizer.step()
    with pytest.raises(RuntimeError, match=r"sparse=False.*torch\.optim\.SGD.*SparseAdam"):
        optimizer.step()
    for param, was in zip(optimizer.param_groups[0]["params"], before):
        assert torch.equal(param, was)
    assert str(optimizer.state_dict()) == str(state)


def test_add_param_group_with_bad_params_leaves_groups_as_they_were():
    """(Hyperparameter values are not checked there, as in torch: test_fidelity.py.)"""
    optimizer = fastmomentum.Adam([nn.Parameter(torch.randn(3))])
    groups = copy.deepcopy(optimizer.param_groups)
    extra = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="float8"):
        eight_bit = extra.detach().to(torch.float8_e4m3fn).requires_grad_()
        optimizer.add_param_group({"params": [eight_bit]})
    assert len(optimizer.param_groups) == len(groups) == 1
    assert len(optimizer.buckets) == 1


def test_param_cast_after_it_has_state_is_reported():
    """(torch.optim.Adam fails there too, part-way: its float32 state cannot take float64
    updates. Cast before the first step, it steps as torch does: test_fidelity.py; what
    each optimizer does with a cast: test_casts.py.)"""
    model = make_model(torch.float32)
    optimizer = fastmomentum.Adam(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    model.double()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match="cast to torch.float64 after its first step"):
        optimizer.step()


def test_tensor_learning_rates_on_the_host_work_and_must_have_one_element():
    param = nn.Parameter(torch.ones(3))
    optimizer = fastmomentum.SGD([param], lr=torch.tensor(0.5))
    param.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(param.detach(), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="must be 1-element"):
        fastmomentum.SGD([param], lr=torch.tensor([0.1, 0.2]))
