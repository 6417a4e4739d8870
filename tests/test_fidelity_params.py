"""What user code does to an optimizer's hyperparameters and parameters between steps,
done to ours and to torch.optim alike: hyperparameters scheduled past the constructor's
checks, parameters listed twice, appended, cast or reshaped, a model built on ``meta``.
Each test compares the parameters after more steps (`tests.twins`: float64, 1e-12
relative).
"""

import warnings

import pytest
import torch
from torch import nn

import fastmomentum

from .assertions import RTOL, assert_relative_close
from .twins import ADAM, ADAMW, AMSGRAD, SGD, TOLERANCE, Twins


@pytest.mark.parametrize(
    ("name", "options", "change"),
    [
        (*SGD, {"lr": -0.05}),  # a LambdaLR gone negative
        ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"momentum": 0.0}),
        (*SGD, {"momentum": -0.5, "dampening": 2.0}),
        (*ADAM, {"lr": -0.01, "eps": -1e-3}),
        (*ADAMW, {"weight_decay": -0.5}),
    ],
)
def test_hyperparameters_changed_after_construction_step_like_torch(name, options, change):
    twins = Twins(name, options)
    twins.step()
    for optimizer in twins.optimizers:
        optimizer.param_groups[0].update(change)
    twins.step()
    twins.assert_same()


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_add_param_group_takes_values_the_constructor_would_refuse(name, options):
    twins = Twins(name, options, shapes=((5, 3), (4,), (6,)), arrange=lambda p: p[:2])
    twins.torch.add_param_group({"params": [twins.theirs[2]], "lr": -0.1})
    twins.fast.add_param_group({"params": [twins.ours[2]], "lr": -0.1})
    twins.step()
    twins.assert_same()


def test_constructor_arguments_are_still_checked():
    param = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastmomentum.SGD([param], lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        fastmomentum.SGD([param], lr=0.1, nesterov=True)


# --- items 8 and 9: duplicates, mixed betas ----------------------------------------------


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM, AMSGRAD])
def test_a_parameter_listed_twice_warns_and_steps_as_in_torch(name, options):
    """torch's loop steps it twice a step; so do we, the second time from the first."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twins = Twins(name, options, arrange=lambda p: [p[0], p[1], p[0]])
    messages = [str(w.message) for w in caught]
    assert sum("duplicate parameters" in m for m in messages) == 2  # torch's and ours
    twins.step(4)
    twins.assert_same()
    steps = {k: v.get("step") for k, v in twins.torch.state_dict()["state"].items()}
    ours = {k: v.get("step") for k, v in twins.fast.state_dict()["state"].items()}
    assert steps.keys() == ours.keys() and all(
        (s is None and ours[k] is None) or float(s) == float(ours[k]) for k, s in steps.items()
    )


def test_betas_of_mixed_types_are_refused_as_in_torch():
    param = nn.Parameter(torch.randn(3))
    for optimizer in (torch.optim.Adam, fastmomentum.Adam):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            optimizer([param], betas=(0.9, torch.tensor(0.99)))


# --- item 10: SGD's state dict has torch's keys -------------------------------------------


def test_sgd_state_dict_groups_have_torchs_keys():
    twins = Twins(*SGD)
    twins.step()
    ours, theirs = twins.fast.state_dict(), twins.torch.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    folded = fastmomentum.SGD(twins.ours, lr=0.1, momentum=0.9, momentum_convention="lr_folded")
    assert folded.state_dict()["param_groups"][0]["momentum_convention"] == "lr_folded"
    twins.fast.load_state_dict(theirs)  # a checkpoint without the key: the default
    assert twins.fast.param_groups[0]["momentum_convention"] == "pytorch"


# --- parameters appended to a group, and the meta-device workflow (item 11) -------------


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_a_parameter_appended_to_a_group_is_stepped_as_in_torch(name, options):
    twins = Twins(name, options, shapes=((5, 3), (4,), (6,)), arrange=lambda p: p[:2])
    twins.step()
    twins.torch.param_groups[0]["params"].append(twins.theirs[2])
    twins.fast.param_groups[0]["params"].append(twins.ours[2])
    twins.step()
    twins.assert_same()


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_extra_keys_in_a_state_entry_are_kept_as_in_torch(name, options):
    """User bookkeeping in ``state[p]``, and a checkpoint's extra keys, survive steps,
    rebinding and loading, and appear in ``state_dict()``."""
    twins = Twins(name, options)
    twins.step()
    for optimizer, params in twins.pairs():
        optimizer.state[params[0]]["seen"] = 7
    twins.step()
    saved = {}
    for optimizer, params in twins.pairs():
        saved[optimizer] = optimizer.state_dict()
        assert saved[optimizer]["state"][0]["seen"] == 7
        saved[optimizer]["state"][1]["note"] = 5  # (torch mangles a str: it is iterable)
        optimizer.load_state_dict(saved[optimizer])
        assert optimizer.state[params[1]]["note"] == 5
        assert optimizer.state[params[0]]["seen"] == 7
    twins.step()
    twins.assert_same()


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_a_model_built_on_meta_trains_after_to_empty(name, options, monkeypatch):
    """torch 2.13's ``to_empty`` keeps the Parameter objects (which the optimizer holds)
    only with ``swap_module_params_on_conversion``; without it both optimizers keep
    stepping the old meta tensors and nothing trains."""
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    torch.manual_seed(0)
    weights = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().state_dict()
    models, optimizers = [], []
    for library in (torch.optim, fastmomentum):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        optimizers.append(getattr(library, name)(model.parameters(), **options))
        model.to_empty(device="cpu")
        model.load_state_dict(weights)
        models.append(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        inputs = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(inputs).square().sum().backward()
            optimizer.step()
    for theirs, ours, loaded in zip(*(m.parameters() for m in models), weights.values()):
        assert not torch.equal(ours.detach(), loaded)  # it did train
        assert_relative_close(ours.detach(), theirs.detach(), TOLERANCE)
    assert optimizers[1].param_groups[0]["params"][0] is models[1][0].weight
    resumed = getattr(fastmomentum, name)(models[1].parameters(), **options)
    resumed.load_state_dict(optimizers[0].state_dict())


def test_stepping_a_model_still_on_meta_names_the_parameter():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    optimizer = fastmomentum.SGD(model.parameters(), lr=0.1)
    model.weight.grad = torch.zeros_like(model.weight)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 is on the meta device"):
        optimizer.step()


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_a_group_with_a_parameter_still_on_meta_steps_and_zeroes_the_others(name, options):
    """The materialized parameters of such a group step and have their gradients reset
    as torch's do; the meta one joins the buckets once materialized (issue 18 review)."""
    twins = Twins(name, options, shapes=((5, 3), (4,)))
    meta = {}
    for optimizer, _ in twins.pairs():
        meta[optimizer] = nn.Parameter(torch.empty(3, dtype=torch.float64, device="meta"))
        optimizer.param_groups[0]["params"].append(meta[optimizer])
    twins.step()
    for optimizer, params in twins.pairs():
        meta[optimizer].grad = torch.empty_like(meta[optimizer])
        optimizer.zero_grad()
        assert meta[optimizer].grad is None and all(p.grad is None for p in params)
    twins.step()
    twins.assert_same()
    for optimizer in meta:  # materialized as to_empty swaps it: stepped from then on
        param = meta[optimizer]
        torch.utils.swap_tensors(param, nn.Parameter(torch.linspace(-1, 1, 3).double()))
        param.grad = torch.ones_like(param)
        optimizer.step()
    theirs, ours = meta.values()
    assert not torch.equal(ours.detach(), torch.linspace(-1, 1, 3, dtype=torch.float64))
    assert_relative_close(ours.detach(), theirs.detach(), TOLERANCE)


# --- item 12: clipping ----------------------------------------------------------------


def test_infinity_norm_clipping_of_an_empty_gradient_raises_as_in_torch():
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(0))]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = fastmomentum.SGD(params, lr=0.1, flat_gradients=True)
    assert optimizer.buckets[0][0].gradients.all_ours()
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type=float("inf"))
    with pytest.raises(RuntimeError, match="empty tensor"):
        optimizer.clip_grad_norm_(1.0, norm_type=float("inf"))


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.5)])
def test_betas_scheduled_out_of_range_give_torch_fuseds_nan_not_an_exception(betas):
    """torch's loop raises (ZeroDivisionError, complex numbers) after updating some
    state; its fused step, like ours, carries on with inf/NaN."""
    twins = Twins("Adam", {"lr": 0.05})
    twins.torch = torch.optim.Adam(twins.theirs, lr=0.05, fused=True)
    twins.step()
    for optimizer in twins.optimizers:
        optimizer.param_groups[0]["betas"] = betas
    twins.step(1)
    twins.assert_same()


@pytest.mark.parametrize("change", ["double", "bfloat16"])
@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_a_parameter_changed_before_its_first_step_is_stepped_as_it_now_is(name, options, change):
    """``model.double()`` (or a cast, or a new shape) after the optimizer was made and
    before it stepped: torch.optim steps the parameters as they now are; so do we."""
    models, optimizers = [], []
    for library, extra in ((torch.optim, {"foreach": False}), (fastmomentum, {})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        optimizers.append(getattr(library, name)(model.parameters(), **options, **extra))
        model.to(getattr(torch, change))
        models.append(model)
    dtype = next(models[0].parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        inputs = torch.randn(5, 4, generator=generator).to(dtype)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(inputs).float().square().sum().backward()
            optimizer.step()
    tolerance = TOLERANCE if dtype == torch.float64 else RTOL["float32"]
    if dtype == torch.bfloat16:
        tolerance = 2 * torch.finfo(torch.bfloat16).eps  # torch's loop rounds each op
    for theirs, ours in zip(*(m.parameters() for m in models)):
        assert ours.dtype == dtype
        assert_relative_close(ours.detach().float(), theirs.detach().float(), tolerance)


@pytest.mark.parametrize(("name", "options"), [SGD, ADAM])
def test_a_parameter_reshaped_before_its_first_step_is_stepped_as_it_now_is(name, options):
    twins = Twins(name, options)
    for _, params in twins.pairs():
        params[0].data = params[0].data.reshape(3, 5)  # was (5, 3)
    twins.step()
    assert twins.ours[0].shape == (3, 5)
    twins.assert_same()


@pytest.mark.parametrize("tensors", ["betas", "lr", "both"])
@pytest.mark.parametrize(("name", "options"), [ADAM, ADAMW])
def test_float32_tensor_hyperparameters_round_as_in_torch(name, options, tensors):
    """Tensor betas or lr (float32) make torch compute ``1 − β2``, the bias corrections,
    the step size and AdamW's decay factor in float32 (found by review: 6e-9 apart
    before); float64 parameters show any difference."""
    twins = Twins(name, options)
    twins.step()
    for optimizer in twins.optimizers:
        group = optimizer.param_groups[0]
        if tensors in ("betas", "both"):
            group["betas"] = (torch.tensor(0.8), torch.tensor(0.95))
        if tensors in ("lr", "both"):
            group["lr"] = torch.tensor(0.01)
    twins.step(4)
    twins.assert_same()
