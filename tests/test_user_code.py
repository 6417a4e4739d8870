"""What user code does to an optimizer besides stepping it, compared with torch.optim."""

import copy
import pickle
from collections import defaultdict

import pytest
import torch
from torch import nn

import fastmomentum

from .assertions import assert_same_training
from .cases import EVERY_RULE, torch_cases
from .models import make_model, train, twins


def both(model, ours, ref_model, theirs, steps=3):
    train(model, ours, steps)
    train(ref_model, theirs, steps)


@torch_cases(*EVERY_RULE)
def test_loading_the_live_state_dict_changes_nothing(name, options):
    """torch.distributed.checkpoint loads into the very tensors state_dict() handed out."""
    model = make_model()
    ours, theirs, ref_model = twins(name, options, model)
    both(model, ours, ref_model, theirs)
    live = torch.optim.Optimizer.state_dict(ours)  # torch's: references, not copies
    ours.load_state_dict(live)
    ours.load_state_dict(ours.state_dict())
    both(model, ours, ref_model, theirs)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@pytest.mark.parametrize("reset", ["clear", "delete-one", "new-dict"])
@torch_cases(*EVERY_RULE)
def test_resetting_state_through_optimizer_state(name, options, reset):
    model = make_model()
    ours, theirs, ref_model = twins(name, options, model)
    both(model, ours, ref_model, theirs)
    for optimizer, net in ((ours, model), (theirs, ref_model)):
        if reset == "clear":
            optimizer.state.clear()
        elif reset == "delete-one":
            del optimizer.state[net.head.weight]
        else:
            optimizer.state = defaultdict(dict)
    both(model, ours, ref_model, theirs)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_deep_copied_and_unpickled_optimizers_keep_training(name, options):
    model = make_model()
    ours, theirs, ref_model = twins(name, options, model)
    both(model, ours, ref_model, theirs)
    our_copy, their_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    our_params = our_copy.param_groups[0]["params"]
    their_params = their_copy.param_groups[0]["params"]
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(our_params, their_params):
            p.grad = q.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        our_copy.step()
        their_copy.step()
    for p, q in zip(our_params, their_params):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)
    # unpickled (parameters and all): the same state, and it steps exactly as the original
    unpickled = pickle.loads(pickle.dumps(our_copy))
    unpickled_params = unpickled.param_groups[0]["params"]
    for _ in range(2):
        for p, q in zip(our_params, unpickled_params):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            q.grad = p.grad.clone()
        our_copy.step()
        unpickled.step()
    for p, q in zip(our_params, unpickled_params):
        assert torch.equal(p, q)
    saved, loaded = our_copy.state_dict(), unpickled.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for index, entry in saved["state"].items():
        assert all(torch.equal(loaded["state"][index][k], v) for k, v in entry.items())


def test_state_dict_is_compact():
    params = [nn.Parameter(torch.randn(1000)) for _ in range(20)]
    optimizer = fastmomentum.Adam(params)
    for param in params:
        param.grad = torch.randn(1000)
    optimizer.step()
    size = len(pickle.dumps(optimizer.state_dict()))
    assert size < 2 * 20 * 2 * 1000 * 4  # about the state's own bytes, not 20 flat buffers


def test_switching_amsgrad_on_mid_run_gives_a_loadable_checkpoint():
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    optimizer.param_groups[0]["amsgrad"] = True
    train(model, optimizer, 2)
    saved = optimizer.state_dict()
    assert all("max_exp_avg_sq" in entry for entry in saved["state"].values())
    fastmomentum.Adam(make_model().parameters(), lr=1e-2).load_state_dict(saved)


@pytest.mark.parametrize("which", ["weight_decay", "momentum"])
def test_tensor_hyperparameters_changed_in_place_take_effect(which):
    model = make_model()
    values = {"weight_decay": torch.tensor(0.0), "momentum": torch.tensor(0.5)}
    ours, theirs, ref_model = twins("SGD", {"lr": 0.05, **{which: values[which]}}, model)
    both(model, ours, ref_model, theirs)
    values[which].fill_(0.25)  # the same tensor object sits in both param groups
    both(model, ours, ref_model, theirs)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_transposed_data_of_a_square_weight(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    ours, theirs, ref_model = twins(name, options, model)
    inputs = torch.randn(5, 6, dtype=torch.float64)
    for step in range(6):
        if step == 3:
            for net in (model, ref_model):
                net[0].weight.data = net[0].weight.data.t()  # same memory, other strides
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


def test_zero_grad_keeps_torchs_tensors_and_their_sharing():
    model = make_model()
    ours, theirs, ref_model = twins("SGD", {"lr": 0.05, "momentum": 0.9}, model)
    for net, optimizer in ((model, ours), (ref_model, theirs)):
        train(net, optimizer, 1)
        held = net.head.weight.grad
        net.head.bias.grad = torch.zeros_like(net.head.bias)
        shared = net.head.bias.grad
        optimizer.zero_grad(set_to_none=False)
        assert net.head.weight.grad is held and not held.any()  # zeroed in place
        assert net.head.bias.grad is shared
    both(model, ours, ref_model, theirs)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)
