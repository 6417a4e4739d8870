"""Param groups appended to ``optimizer.param_groups`` directly, not through
``add_param_group``: torch.optim steps and checkpoints them, and so do we.

torch's own ``test_state_dict_deterministic`` extends ``param_groups`` with itself; a
parameter in two groups is then stepped once per group, on one state.
"""

import copy

import pytest
import torch

import fastmomentum

from .assertions import IMPLEMENTATION_KEYS, assert_same_training
from .cases import EVERY_RULE, torch_cases
from .models import make_model, train

STEPS = 6


def extend_with_itself(optimizer, model):
    optimizer.param_groups.extend(optimizer.param_groups)


def append_an_earlier_parameter(optimizer, model):
    """A new group (its own dict, another lr) holding a parameter of group 0."""
    group = {**optimizer.param_groups[0], "params": [model.head.weight]}
    group["lr"] = group["lr"] * 0.5
    optimizer.param_groups.append(group)


def move_a_parameter_to_a_new_group(optimizer, model):
    """A parameter moved from group 0 to a new group with every hyperparameter given
    (what ``add_param_group`` would have filled in; torch's step needs them all)."""
    params = optimizer.param_groups[0]["params"]
    del params[next(i for i, p in enumerate(params) if p is model.head.bias)]
    group = {**optimizer.param_groups[0], "params": [model.head.bias]}
    optimizer.param_groups.append(group)


def hyperparameters(state_dict):
    return [
        {key: value for key, value in group.items() if key not in IMPLEMENTATION_KEYS}
        for group in state_dict["param_groups"]
    ]


EDITS = [extend_with_itself, append_an_earlier_parameter, move_a_parameter_to_a_new_group]


def train_with_edit(library, name, options, edit):
    """Two steps, the edit, then more steps; the state dict before and after the edit."""
    model = make_model()
    if library is torch.optim:
        options = {**options, "foreach": False}
    optimizer = getattr(library, name)(model.parameters(), **options)
    train(model, optimizer, 2)
    edit(optimizer, model)
    edited = copy.deepcopy(optimizer.state_dict())  # bucketed at the state dict...
    train(model, optimizer, STEPS, first=2)  # ...and stepped
    return model, optimizer, edited


@pytest.mark.parametrize("edit", EDITS, ids=lambda edit: edit.__name__)
@torch_cases(*EVERY_RULE)
def test_a_group_appended_directly_steps_and_checkpoints_as_in_torch(name, options, edit):
    model, optimizer, edited = train_with_edit(fastmomentum, name, options, edit)
    ref_model, ref_optimizer, ref_edited = train_with_edit(torch.optim, name, options, edit)
    assert hyperparameters(edited) == hyperparameters(ref_edited)
    assert edited["state"].keys() == ref_edited["state"].keys()
    assert_same_training((model, optimizer), (ref_model, ref_optimizer), torch.float64)


def test_lamb_steps_a_parameter_of_two_groups_twice_on_one_state():
    """LAMB has no torch peer: a parameter in two groups steps as two steps do."""
    model, optimizer, _ = train_with_edit(fastmomentum, "LAMB", {"lr": 1e-2}, extend_with_itself)
    ref_model = make_model()
    ref_optimizer = fastmomentum.LAMB(ref_model.parameters(), lr=1e-2)
    train(ref_model, ref_optimizer, 2)
    twice = ref_optimizer.step
    ref_optimizer.step = lambda: (twice(), twice())  # the same gradients, stepped twice
    train(ref_model, ref_optimizer, STEPS, first=2)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_a_group_appended_without_hyperparameters_gets_the_defaults():
    """torch's step raises ``KeyError`` for it; ours takes it as ``add_param_group``
    would: the defaults filled in, the parameters checked, stepped with the rest."""
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer.param_groups.append({"params": extra, "lr": 0.1})
    extra.grad = torch.ones_like(extra)
    before = extra.detach().clone()
    optimizer.step()
    group = optimizer.param_groups[-1]
    assert group["params"] == [extra] and group["lr"] == 0.1
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert torch.allclose(extra.detach(), before - 0.1)  # Adam's first step: lr·sign(g)
    assert optimizer.state_dict()["param_groups"][-1]["params"] == [len(list(model.parameters()))]


def test_an_appended_group_is_checked_before_anything_changes():
    model = make_model()
    optimizer = fastmomentum.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, 1)
    before = [p.detach().clone() for p in model.parameters()]
    complex_param = torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))
    optimizer.param_groups.append({"params": [complex_param], "lr": 0.1})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="complex"):
        optimizer.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    optimizer.param_groups.pop()
    optimizer.step()  # without it, the optimizer steps as before
    assert not torch.equal(next(model.parameters()), before[0])


def test_groups_removed_from_param_groups_directly_are_dropped():
    model = make_model()
    params = list(model.parameters())
    optimizer = fastmomentum.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    ref_model = copy.deepcopy(model)
    ref_params = list(ref_model.parameters())
    reference = torch.optim.SGD([{"params": ref_params[:2]}, {"params": ref_params[2:]}], lr=0.1)
    before = params[0].detach().clone()
    for opt in (optimizer, reference):
        del opt.param_groups[0]
    train(model, optimizer, 3)
    train(ref_model, reference, 3)
    assert_same_training((model, optimizer), (ref_model, reference), torch.float64)
    assert torch.equal(params[0], before)  # no longer in any group: not stepped
