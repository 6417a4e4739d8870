"""A model cast to another dtype mid-run (``model.double()``, ``model.half()`` and back).

What torch.optim's for-loop does, and so what we do:
- a parameter cast after its first step keeps its state in the old dtype. SGD, Adagrad
  and RMSprop (not centered) go on stepping it, computing in the wider of the two dtypes
  as torch's ops do; Adam, AdamW, NAdam and centered RMSprop cannot (torch's ``lerp``
  refuses mixed dtypes part-way through the parameters; ours refuses before any change);
- a parameter cast before it has state steps as it now is;
- ``load_state_dict`` gives the loaded state each parameter's current dtype.
"""

import copy

import pytest
import torch

import fastmomentum

from .assertions import RTOL, assert_relative_close, assert_same_training
from .cases import CASES, EVERY_RULE, torch_cases
from .models import backward, make_model, train

#: Cases whose torch.optim for-loop steps a parameter whose state has another dtype.
STEPS_CAST = ("sgd", "nesterov", "sgd-dampened", "adagrad", "rmsprop-momentum")
#: Cases whose torch.optim for-loop raises there.
REFUSES_CAST = ("adam-amsgrad", "adamw", "nadam", "rmsprop")
CASTS = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16),
]
RMSPROP_MOMENTUM = ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-2})


def case(case_id):
    return RMSPROP_MOMENTUM if case_id == "rmsprop-momentum" else CASES[case_id]


def pair(name, options, dtype):
    """(model, ours), (a copy, torch's for-loop)."""
    model = make_model(dtype)
    ref_model = copy.deepcopy(model)
    ours = getattr(fastmomentum, name)(model.parameters(), **options)
    theirs = getattr(torch.optim, name)(ref_model.parameters(), foreach=False, **options)
    return (model, ours), (ref_model, theirs)


def state_dtypes(optimizer):
    """Each parameter's state tensors' dtypes (not the scalar state: torch's load casts
    NAdam's ``mu_product`` to the parameter's dtype; ours keeps it as its step count)."""
    return [
        {
            key: value.dtype
            for key, value in optimizer.state[p].items()
            if key not in ("step", "mu_product")
        }
        for group in optimizer.param_groups
        for p in group["params"]
    ]


@pytest.mark.parametrize(("before", "after"), CASTS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case_id", STEPS_CAST)
def test_a_parameter_cast_after_its_first_step_steps_as_in_torch(case_id, before, after):
    name, options = case(case_id)
    ours, theirs = pair(name, options, before)
    for model, optimizer in (ours, theirs):
        train(model, optimizer, 3, before)
        model.to(after)
        train(model, optimizer, 8, after, first=3)
    assert state_dtypes(ours[1]) == state_dtypes(theirs[1])  # the state kept its dtype
    assert all(d == before for entry in state_dtypes(ours[1]) for d in entry.values())
    # the first steps in float32 differ by float32 rounding; the cast steps are torch's
    tolerance = RTOL["float32"] if torch.float32 in (before, after) else RTOL["float64"]
    if after == torch.bfloat16:
        tolerance = 2.0**-7  # one bf16 rounding of the parameters
    for (label, p), q in zip(ours[0].named_parameters(), theirs[0].parameters()):
        assert p.dtype == after
        assert_relative_close(p.detach().double(), q.detach().double(), tolerance, label)


@pytest.mark.parametrize("case_id", REFUSES_CAST)
def test_a_cast_torch_cannot_step_is_refused_before_any_change(case_id):
    name, options = case(case_id)
    ours, theirs = pair(name, options, torch.float32)
    for model, optimizer in (ours, theirs):
        train(model, optimizer, 2, torch.float32)
        model.double()
    with pytest.raises(RuntimeError):
        train(*theirs, 3, torch.float64, first=2)
    model, optimizer = ours
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match="cast to torch.float64 after its first step"):
        train(model, optimizer, 3, torch.float64, first=2)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    after = optimizer.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


@pytest.mark.parametrize("case_id", ("sgd", "adagrad", "adamw"))
def test_a_group_cast_with_a_parameter_without_state_converts_no_state(case_id):
    """One parameter has had no gradient yet; the others' state must not be converted
    when the group is bucketed again for it."""
    name, options = case(case_id)
    ours, theirs = pair(name, options, torch.float32)
    for model, optimizer in ours, theirs:
        for step in range(2):
            optimizer.zero_grad()
            backward(model, step, torch.float32)
            model.head.bias.grad = None
            optimizer.step()
        model.double()
    if name == "AdamW":  # torch fails at the first parameter with state; we, before it
        with pytest.raises(RuntimeError):
            train(*theirs, 3, torch.float64)
        with pytest.raises(RuntimeError, match="after its first step"):
            train(*ours, 3, torch.float64)
        assert ours[0].head.bias not in ours[1].state or name == "Adagrad"
        assert all(d == torch.float32 for entry in state_dtypes(ours[1]) for d in entry.values())
        return
    train(*ours, 4, torch.float64)
    train(*theirs, 4, torch.float64)
    assert state_dtypes(ours[1]) == state_dtypes(theirs[1])
    for p, q in zip(ours[0].parameters(), theirs[0].parameters()):
        assert_relative_close(p.detach(), q.detach(), RTOL["float32"])


@torch_cases(*EVERY_RULE)
def test_load_state_dict_after_a_cast_gives_the_state_the_parameters_dtype(name, options):
    ours, theirs = pair(name, options, torch.float32)
    for model, optimizer in ours, theirs:
        train(model, optimizer, 3, torch.float32)
        checkpoint = copy.deepcopy(optimizer.state_dict())
        model.double()
        optimizer.load_state_dict(checkpoint)
    assert state_dtypes(ours[1]) == state_dtypes(theirs[1])
    assert all(d == torch.float64 for entry in state_dtypes(ours[1]) for d in entry.values())
    for model, optimizer in ours, theirs:
        train(model, optimizer, 8, torch.float64, first=3)
    assert_same_training(ours, theirs, torch.float32)  # the first steps were float32


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_zero_grad_in_place_after_a_cast_with_flat_gradients(name):
    """The cast parameters' gradients are not pieces of our float32 allocation: they are
    zeroed where they are, as torch zeroes them."""
    model = make_model(torch.float32)
    optimizer = getattr(fastmomentum, name)(model.parameters(), lr=1e-3, flat_gradients=True)
    model.double()
    model(torch.randint(0, 32, (4, 12))).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    optimizer.zero_grad(set_to_none=False)
    for p, grad in zip(model.parameters(), grads):
        assert p.grad is grad and p.grad.dtype == torch.float64
        assert not p.grad.any()
    train(model, optimizer, 2, torch.float64, set_to_none=False)  # and steps as it now is
