"""Optional state keys (Adam's ``max_exp_avg_sq``, RMSprop's ``momentum_buffer`` and
``grad_avg``) appear in ``state[p]`` and the state dict exactly where torch's have them:
only for a parameter a step has used them on, or a load gave them to."""

import pytest
import torch

import fastmomentum

from .assertions import RTOL, assert_relative_close

#: (optimizer, the setting that makes it keep optional state, its values on and off).
SWITCHES = [
    ("Adam", "amsgrad", True, False),
    ("AdamW", "amsgrad", True, False),
    ("RMSprop", "momentum", 0.9, 0.0),
    ("RMSprop", "centered", True, False),
]


def keys_per_param(optimizer, params):
    return [sorted(optimizer.state[p]) if p in optimizer.state else None for p in params]


def keys_in_state_dict(optimizer):
    return {key: sorted(entry) for key, entry in optimizer.state_dict()["state"].items()}


def user_actions(library, name, setting, on, off):
    """Switch the setting on for a first parameter's steps, off before a second parameter
    first steps, clear the state, load a checkpoint taken in between, switch it on
    again; the key sets of ``state[p]`` and of the state dict after each action.
    (Stepping the second parameter then would raise ``KeyError`` in torch; ours starts
    its optional state at zero.)"""
    torch.manual_seed(0)
    first, second = (torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2))
    optimizer = getattr(library, name)([first, second], lr=1e-2, **{setting: on})
    seen = []

    def step(*params):
        for param in (first, second):
            param.grad = torch.randn_like(param) if any(param is p for p in params) else None
        optimizer.step()
        seen.append((keys_per_param(optimizer, [first, second]), keys_in_state_dict(optimizer)))

    step(first)
    step(first)
    optimizer.param_groups[0][setting] = off
    step(first, second)  # the second's first state: without the optional key
    checkpoint = optimizer.state_dict()
    optimizer.state.clear()
    step(first, second)  # both start afresh, the setting off: no optional key
    optimizer.load_state_dict(checkpoint)
    seen.append((keys_per_param(optimizer, [first, second]), keys_in_state_dict(optimizer)))
    step(first, second)
    optimizer.param_groups[0][setting] = on
    step(first)  # on again: the second (no gradient) stays without it
    return seen, [first.detach(), second.detach()]


@pytest.mark.parametrize(
    ("name", "setting", "on", "off"), SWITCHES, ids=[f"{s[0]}-{s[1]}" for s in SWITCHES]
)
def test_optional_state_keys_are_where_torch_has_them(name, setting, on, off):
    ours, our_params = user_actions(fastmomentum, name, setting, on, off)
    theirs, their_params = user_actions(torch.optim, name, setting, on, off)
    for action, (mine, reference) in enumerate(zip(ours, theirs)):
        assert mine == reference, f"after action {action}"
    for param, reference in zip(our_params, their_params):
        assert_relative_close(param, reference, RTOL["float32"])
