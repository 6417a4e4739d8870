"""torch.amp.GradScaler with our optimizers: the fused protocol of torch's fused optimizers.

Every optimizer of the table runs; one torch has too is compared with it (within
`RTOL`), one torch lacks (LAMB) with itself trained on the unscaled loss with the
skipped steps skipped by hand: bit for bit, since the loss scales are powers of two,
so scaling and unscaling the gradients is exact.
"""

import pytest
import torch
from torch import nn

import fastmomentum

from .assertions import assert_same_training
from .cases import OPTIMIZERS, every_optimizer
from .models import batches, make_model

POISONED_STEPS = {4, 9}  # an inf gradient: GradScaler must skip these steps


def train_with_scaler(library, name, options, unscale_first, steps=16, scaled=True):
    """Train with a GradScaler (``scaled``), or without one as the scaled run should:
    the loss unscaled and the steps it skips skipped by hand."""
    model = make_model(torch.float32)
    optimizer = getattr(library, name)(model.parameters(), **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    params_at, scales = {}, []
    for step, (tokens, targets) in enumerate(batches(steps, torch.float32)):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), targets)
        (scaler.scale(loss) if scaled else loss).backward()
        if step in POISONED_STEPS:
            model.head.weight.grad[0, 0] = float("inf")
        if unscale_first:
            if scaled:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        params_at[step] = [p.detach().clone() for p in model.parameters()]
        if scaled:
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
        elif step not in POISONED_STEPS:
            optimizer.step()
    return model, optimizer, params_at, scales


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "unscale_"])
@every_optimizer(cases={"SGD": ("nesterov",)})
def test_grad_scaler_trains_like_torch_and_skips_inf_steps(name, options, unscale_first):
    model, optimizer, before, scales = train_with_scaler(fastmomentum, name, options, unscale_first)
    assert scales[4] < scales[3], "the scale must back off on inf"
    if OPTIMIZERS[name].torch_peer is None:  # the same optimizer, no scaler: bit for bit
        ref_model, ref_optimizer, _, _ = train_with_scaler(
            fastmomentum, name, options, unscale_first, scaled=False
        )
        assert_same_training((model, optimizer), (ref_model, ref_optimizer), torch.float32, 0.0)
    else:
        ref_model, ref_optimizer, _, ref_scales = train_with_scaler(
            torch.optim, OPTIMIZERS[name].torch_peer, options, unscale_first
        )
        assert scales == ref_scales
        assert_same_training((model, optimizer), (ref_model, ref_optimizer), torch.float32)
    # a skipped step changes nothing: the parameters before step 5 equal those before 4
    for p, q in zip(before[4], before[5]):
        assert torch.equal(p, q)


def scaled_step(optimizer, param):
    """``scaler.step`` on gradients scaled by 1024, which it leaves unscaled in place."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(param.sum()).backward()
    assert torch.equal(param.grad, torch.full((2,), 1024.0))
    scaler.step(optimizer)
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    assert torch.equal(param.grad, torch.ones(2))


@every_optimizer(cases={"SGD": ("nesterov",)})
def test_the_fused_path_is_used_and_leaves_unscaled_gradients_like_torch_fused(name, options):
    """``scaler.step`` hands our step the scale with the gradients still scaled (the
    protocol of torch's fused optimizers); the parameters are then torch's: its fused
    step where it has one, else its step after ``unscale_``; without a peer, ours
    stepped on unscaled gradients."""
    info = OPTIMIZERS[name]
    param = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = info.cls([param], **options)
    given = []  # what the step is handed: the scale, and the gradients as they are
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: given.append((float(opt.grad_scale), param.grad.clone()))
    )
    scaled_step(optimizer, param)
    ((grad_scale, grad),) = given
    assert grad_scale == 1024.0 and torch.equal(grad, torch.full((2,), 1024.0))

    reference = nn.Parameter(torch.tensor([1.0, 2.0]))
    if info.peer is None:
        reference.grad = torch.ones(2)
        info.cls([reference], **options).step()
    else:
        fused = {"fused": True} if info.peer_has_fused else {}
        scaled_step(info.peer([reference], **options, **fused), reference)
    assert not torch.equal(param.detach(), torch.tensor([1.0, 2.0])), "no step was taken"
    assert torch.equal(param.detach(), reference.detach())
