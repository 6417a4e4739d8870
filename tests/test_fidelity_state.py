"""What user code does to an optimizer's state between steps, done to ours and to
torch.optim alike: state entries reset, AMSGrad toggled, load and state-dict hooks. Each
test compares the parameters after more steps (`tests.twins`: float64, 1e-12 relative).
"""

import copy

import pytest
import torch

from .assertions import assert_relative_close
from .twins import ADAM, AMSGRAD, SGD, TOLERANCE, Twins

# --- item 3: per-entry state resets -----------------------------------------------------


def _clear(optimizer, param):
    optimizer.state[param].clear()


def _assign_empty(optimizer, param):
    optimizer.state[param] = {}


def _momentum_none(optimizer, param):
    optimizer.state[param]["momentum_buffer"] = None


def _delete_then_read_another(optimizer, param):
    del optimizer.state[param]
    other = optimizer.param_groups[0]["params"][1]
    optimizer.state[other]  # the dict's length is what it was
    optimizer.state[param]


def _clear_all_then_read(optimizer, param):
    optimizer.state.clear()
    for other in optimizer.param_groups[0]["params"]:
        optimizer.state[other]


def _replace_value(optimizer, param):
    key = "momentum_buffer" if "momentum_buffer" in optimizer.state[param] else "exp_avg"
    optimizer.state[param][key] = torch.ones_like(param)


RESETS = [
    _clear,
    _assign_empty,
    _momentum_none,
    _delete_then_read_another,
    _clear_all_then_read,
    _replace_value,
]


@pytest.mark.parametrize(
    ("name", "options", "reset"),
    [(*SGD, reset) for reset in RESETS]
    + [(*ADAM, reset) for reset in RESETS if reset is not _momentum_none],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_state_entry_reset_by_user_code_restarts_as_in_torch(name, options, reset):
    twins = Twins(name, options)
    twins.step()
    for optimizer, params in twins.pairs():
        reset(optimizer, params[0])
    # the checkpoint shows what the next step starts from, as torch's does
    ours, theirs = twins.fast.state_dict()["state"], twins.torch.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in theirs:
        assert ours[index].keys() == theirs[index].keys()
    twins.step()
    twins.assert_same()
    assert twins.fast.state_dict()["state"].keys() == twins.torch.state_dict()["state"].keys()


def test_an_entry_read_before_the_first_step_is_the_one_filled():
    """torch fills the very dict ``state[p]`` returned before the first step."""
    twins = Twins(*ADAM)
    entry = twins.fast.state[twins.ours[0]]
    twins.step(1)
    assert entry is twins.fast.state[twins.ours[0]]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}


# --- item 4: AMSGrad toggled -----------------------------------------------------------


def _set_amsgrad(twins, on):
    for optimizer in twins.optimizers:
        optimizer.param_groups[0]["amsgrad"] = on


def test_amsgrad_switched_off_keeps_max_exp_avg_sq_and_resumes_like_torch():
    twins = Twins(*AMSGRAD)
    twins.step()
    _set_amsgrad(twins, False)
    twins.step()
    saved = twins.fast.state_dict()
    assert "max_exp_avg_sq" in saved["state"][0]
    theirs = twins.torch.state_dict()["state"][0]["max_exp_avg_sq"]
    assert_relative_close(saved["state"][0]["max_exp_avg_sq"], theirs, TOLERANCE)
    _set_amsgrad(twins, True)
    twins.fast.load_state_dict(copy.deepcopy(twins.torch.state_dict()))
    twins.step()
    twins.assert_same()


@pytest.mark.parametrize("between", ["deepcopy", "read another entry", "state_dict round trip"])
def test_amsgrad_switched_on_keeps_the_adam_state(between):
    """Switched on mid-run, ``max_exp_avg_sq`` starts at zero (torch.optim raises
    KeyError instead); nothing done before the next step resets the step counts."""
    twins = Twins(*ADAM)
    twins.step()
    twins.fast.param_groups[0]["amsgrad"] = True
    optimizer = twins.fast
    if between == "deepcopy":
        optimizer = copy.deepcopy(optimizer)
    elif between == "read another entry":
        optimizer.state[twins.ours[1]]
    else:
        optimizer.load_state_dict(optimizer.state_dict())
    param = optimizer.param_groups[0]["params"][0]
    assert float(optimizer.state[param]["step"]) == 3.0
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert float(optimizer.state[param]["step"]) == 4.0
    entry = optimizer.state[param]
    assert torch.equal(entry["max_exp_avg_sq"], entry["exp_avg_sq"])


# --- item 5: load_state_dict hooks -------------------------------------------------------


def test_load_pre_hooks_run_before_the_checks_and_post_hooks_after_the_load():
    twins = Twins(*ADAM)
    twins.step()
    saved = twins.fast.state_dict()
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["params"] = broken["param_groups"][0]["params"][:1]

    def repair(optimizer, state_dict):
        calls.append("pre")
        return copy.deepcopy(saved)

    fresh = Twins(*ADAM)
    calls = []
    for optimizer, params in fresh.pairs():
        optimizer.register_load_state_dict_pre_hook(repair)
        optimizer.register_load_state_dict_post_hook(
            lambda opt, first=params[0]: calls.append(("post", float(opt.state[first]["step"])))
        )
        optimizer.load_state_dict(broken)  # the hook repairs what the check would refuse
        assert calls == ["pre", ("post", 3.0)]
        calls.clear()
    fresh.step()
    fresh.assert_same()


def test_a_dict_a_pre_hook_breaks_is_refused_and_nothing_changes():
    twins = Twins(*ADAM)
    twins.step()
    saved = twins.fast.state_dict()
    before = copy.deepcopy(twins.fast.state_dict())

    def break_shape(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
        return state_dict

    twins.fast.register_load_state_dict_pre_hook(break_shape)
    with pytest.raises(ValueError, match="has shape"):
        twins.fast.load_state_dict(saved)
    after = twins.fast.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    twins.step()  # and it still trains like torch
    twins.assert_same()


def test_state_dict_hooks_run_as_in_torch():
    twins = Twins(*SGD)
    twins.step()
    for optimizer in twins.optimizers:
        optimizer.register_state_dict_pre_hook(lambda opt: opt.state.__setitem__("note", 5))
        optimizer.register_state_dict_post_hook(
            lambda opt, state_dict: {**state_dict, "extra": "kept"}
        )
    ours, theirs = twins.fast.state_dict(), twins.torch.state_dict()
    assert ours["extra"] == theirs["extra"] == "kept"
    # item 7: a non-dict value in optimizer.state is returned, as torch returns it
    assert ours["state"]["note"] == theirs["state"]["note"] == 5
    twins.fast.load_state_dict(ours)
    twins.torch.load_state_dict(theirs)
    twins.step()
    twins.assert_same()


# --- item 6: hyperparameters are checked in the constructor only --------------------------
