"""state_dict / load_state_dict in torch's format, loadable both ways, checked before loading."""

import copy
import io

import pytest
import torch

import fastmomentum

from .assertions import assert_same_training
from .cases import OPTIMIZERS, every_optimizer, has_torch_peer
from .models import make_model, train

#: The cases run for SGD and Adam (the other optimizers run their rules' cases).
VARIANTS = {"SGD": ("nesterov",), "Adam": ("adam-amsgrad-small-decay",)}


def through_file(state_dict):
    """What a checkpoint gives back: ``torch.save`` then ``torch.load``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def keep_scalar_state_dtypes(optimizer, state_dict, info):
    """Undo what torch's ``load_state_dict`` does to scalar state other than ``step``:
    it casts it to the parameter's dtype, so NAdam's ``mu_product``, which torch keeps in
    float32 (as ours does), becomes float64 for float64 parameters, and a torch run
    resumed from torch's own checkpoint then drifts from its uninterrupted run (3e-7
    relative in ``mu_product`` after 30 more steps). Back to the checkpoint's dtype, the
    resumed run is the uninterrupted one, at the usual bound."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state_dict["state"].items():
        for key in info.scalar_state.keys() - {"step"}:
            state = optimizer.state[params[index]]
            state[key] = state[key].to(entry[key].dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
@every_optimizer(has_torch_peer, cases=VARIANTS)
def test_checkpoint_resumes_in_the_other_library(name, options, direction, dtype):
    first, second = (OPTIMIZERS[name].peer, OPTIMIZERS[name].cls)
    if direction == "ours-to-torch":
        first, second = second, first
    model = make_model(dtype)
    optimizer = first(model.parameters(), **options)
    train(model, optimizer, 30, dtype)
    checkpoint = through_file({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    resumed_model = make_model(dtype, seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = second(resumed_model.parameters(), **options)
    resumed.load_state_dict(checkpoint["optimizer"])
    if direction == "ours-to-torch":
        keep_scalar_state_dtypes(resumed, checkpoint["optimizer"], OPTIMIZERS[name])

    train(model, optimizer, 30, dtype)
    train(resumed_model, resumed, 30, dtype)
    pairs = [(resumed_model, resumed), (model, optimizer)]
    if direction == "ours-to-torch":
        pairs.reverse()
    assert_same_training(*pairs, dtype)


@every_optimizer(cases=VARIANTS)
def test_own_checkpoint_resumes_bit_identically(name, options):
    """A run resumed from a checkpoint is the uninterrupted run, bit for bit (every
    optimizer, LAMB included, whose peer is missing from torch)."""
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
    state, uninterrupted = resumed.state_dict()["state"], optimizer.state_dict()["state"]
    assert state.keys() == uninterrupted.keys()
    for index, entry in uninterrupted.items():  # step counts and scalar state included
        assert state[index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(state[index][key], value), f"state {index} {key}"


def test_the_case_table_has_every_optimizer_of_the_library():
    """`cases.OPTIMIZERS` drives the suites that must hold for every optimizer: a new
    one must have its row, or those suites would silently leave it out."""
    exported = {
        name
        for name in fastmomentum.__all__
        if isinstance(getattr(fastmomentum, name), type)
        and issubclass(getattr(fastmomentum, name), torch.optim.Optimizer)
    }
    assert exported == set(OPTIMIZERS), f"rows missing for {exported - set(OPTIMIZERS)}"
    for info in OPTIMIZERS.values():
        assert info.kernel is None or callable(getattr(fastmomentum.kernels, info.kernel))


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
