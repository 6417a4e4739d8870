"""torch.amp.GradScaler with our optimizers: the fused protocol of torch's fused optimizers."""

import pytest
import torch
from torch import nn

import fastmomentum

from .assertions import assert_same_training
from .cases import torch_cases
from .models import batches, make_model

POISONED_STEPS = {4, 9}  # an inf gradient: GradScaler must skip these steps


def train_with_scaler(library, name, options, unscale_first, steps=16):
    model = make_model(torch.float32)
    optimizer = getattr(library, name)(model.parameters(), **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    params_at, scales = {}, []
    for step, (tokens, targets) in enumerate(batches(steps, torch.float32)):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), targets)
        scaler.scale(loss).backward()
        if step in POISONED_STEPS:
            model.head.weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        params_at[step] = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, optimizer, params_at, scales


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "unscale_"])
@torch_cases("nesterov", "adam-amsgrad", "adamw")
def test_grad_scaler_trains_like_torch_and_skips_inf_steps(name, options, unscale_first):
    model, optimizer, before, scales = train_with_scaler(fastmomentum, name, options, unscale_first)
    ref_model, ref_optimizer, _, ref_scales = train_with_scaler(
        torch.optim, name, options, unscale_first
    )
    assert scales == ref_scales and scales[4] < scales[3], "the scale must back off on inf"
    assert_same_training((model, optimizer), (ref_model, ref_optimizer), torch.float32)
    # a skipped step changes nothing: the parameters before step 5 equal those before 4
    _, _, probe, _ = train_with_scaler(fastmomentum, name, options, unscale_first, steps=6)
    for p, q in zip(probe[4], probe[5]):
        assert torch.equal(p, q)


def test_the_fused_path_is_used_and_leaves_unscaled_gradients_like_torch_fused():
    params = {}
    for library in (fastmomentum, torch.optim):
        param = nn.Parameter(torch.tensor([1.0, 2.0]))
        options = {"fused": True} if library is torch.optim else {}
        optimizer = library.SGD([param], lr=0.5, **options)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(param.sum()).backward()
        assert torch.equal(param.grad, torch.tensor([1024.0, 1024.0]))
        scaler.step(optimizer)
        assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
        params[library] = param
    ours, theirs = params[fastmomentum], params[torch.optim]
    assert torch.equal(ours.detach(), torch.tensor([0.5, 1.5]))
    assert torch.equal(ours.detach(), theirs.detach())
    assert torch.equal(ours.grad, theirs.grad) and torch.equal(ours.grad, torch.ones(2))
