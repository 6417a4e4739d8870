"""state_dict / load_state_dict in torch's format, loadable both ways, checked before loading."""

import copy
import io

import pytest
import torch

import fastmomentum

from .assertions import assert_relative_close, assert_same_training
from .cases import torch_cases
from .models import make_model, train


def through_file(state_dict):
    """What a checkpoint gives back: ``torch.save`` then ``torch.load``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
@torch_cases("nesterov", "adam-amsgrad-small-decay", "adamw")
def test_checkpoint_resumes_in_the_other_library(name, options, direction, dtype):
    first, second = (torch.optim, fastmomentum)
    if direction == "ours-to-torch":
        first, second = second, first
    model = make_model(dtype)
    optimizer = getattr(first, name)(model.parameters(), **options)
    train(model, optimizer, 30, dtype)
    checkpoint = through_file({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    resumed_model = make_model(dtype, seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = getattr(second, name)(resumed_model.parameters(), **options)
    resumed.load_state_dict(checkpoint["optimizer"])

    train(model, optimizer, 30, dtype)
    train(resumed_model, resumed, 30, dtype)
    pairs = [(resumed_model, resumed), (model, optimizer)]
    if direction == "ours-to-torch":
        pairs.reverse()
    assert_same_training(*pairs, dtype)


@torch_cases("nesterov", "adam-amsgrad-small-decay", "adamw")
def test_own_checkpoint_resumes_bit_identically(name, options):
    model = make_model(torch.float32)
    optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
    train(model, optimizer, 10, torch.float32)
    checkpoint = through_file({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    resumed_model = make_model(torch.float32, seed=5)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = getattr(fastmomentum, name)(resumed_model.parameters(), **options)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, 10, torch.float32)
    train(resumed_model, resumed, 10, torch.float32)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert_relative_close(
        torch.cat(
            [v.flatten() for s in resumed.state.values() for k, v in s.items() if k != "step"]
        ),
        torch.cat(
            [v.flatten() for s in optimizer.state.values() for k, v in s.items() if k != "step"]
        ),
        0.0,
        "state",
    )


def test_loaded_state_is_copied_into_the_flat_buffers():
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    param = next(model.parameters())
    saved_exp_avg = saved["state"][0]["exp_avg"]
    assert optimizer.state[param]["exp_avg"].data_ptr() != saved_exp_avg.data_ptr()
    train(model, optimizer, 1)
    assert not torch.equal(optimizer.state[param]["exp_avg"], saved_exp_avg)


def test_torch_sgd_checkpoint_gets_our_defaults():
    model = make_model()
    reference = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, reference, 2)
    ours = fastmomentum.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert ours.param_groups[0]["momentum_convention"] == "pytorch"


def snapshot(model, optimizer):
    return copy.deepcopy((list(model.parameters()), optimizer.state_dict()))


def assert_unchanged(model, optimizer, before):
    params, state_dict = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = optimizer.state_dict()
    assert after["param_groups"] == state_dict["param_groups"]
    assert after["state"].keys() == state_dict["state"].keys()
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)


def _wrong_shape(state_dict):
    state_dict["state"][1]["exp_avg"] = torch.zeros(3)


def _wrong_group_count(state_dict):
    state_dict["param_groups"].append(copy.deepcopy(state_dict["param_groups"][0]))


def _wrong_param_count(state_dict):
    state_dict["param_groups"][0]["params"].pop()


def _missing_step(state_dict):
    del state_dict["state"][2]["step"]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_wrong_shape, "has shape \\(3,\\)"),
        (_wrong_group_count, "parameter groups"),
        (_wrong_param_count, "parameters"),
        (_missing_step, "no 'step'"),
    ],
)
def test_bad_checkpoint_is_rejected_and_nothing_changes(corrupt, message):
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    before = snapshot(model, optimizer)
    bad = copy.deepcopy(optimizer.state_dict())
    corrupt(bad)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(bad)
    assert_unchanged(model, optimizer, before)
    train(model, optimizer, 1)  # still usable
