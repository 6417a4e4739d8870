"""``fused_zero_grad=True``: the step zeroes the gradients it reads, in the same pass.

The trajectory must be exactly that of ``step(); zero_grad(set_to_none=False)``: the
same parameters bit for bit (the update is the same kernel), and gradients left zero,
in place, whatever their layout (a gradient not laid out like its parameter is staged
through a copy, and the gradient itself is zeroed).
"""

import pytest
import torch
from torch import nn

import fastmomentum

from .cases import OPTIMIZERS, every_optimizer


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a transposed layout
    return model


def _train(model, optimizer, steps, fused, dtype):
    generator = torch.Generator().manual_seed(1)
    grads_after = []
    for _ in range(steps):
        inputs = torch.randn(8, 6, generator=generator).to(dtype)
        if not fused:
            optimizer.zero_grad(set_to_none=False)
        model(inputs).square().mean().backward()
        optimizer.step()
        grads_after.append([p.grad.clone() for p in model.parameters()])
    return grads_after


@pytest.mark.parametrize("flat_gradients", [False, True], ids=["autograd's grads", "flat"])
@every_optimizer(
    cases={"SGD": ("nesterov-decay", "sgd-plain")}, dtypes=[torch.float32, torch.bfloat16]
)  # LAMB: float32 only
def test_the_fused_zero_grad_trains_as_step_then_zero_grad(name, options, dtype, flat_gradients):
    reference, fused = _model(dtype), _model(dtype)
    optimizers = [
        getattr(fastmomentum, name)(
            model.parameters(), **options, flat_gradients=flat_gradients, fused_zero_grad=flag
        )
        for model, flag in ((reference, False), (fused, True))
    ]
    _train(reference, optimizers[0], 6, False, dtype)
    grads_after = _train(fused, optimizers[1], 6, True, dtype)
    for p, q in zip(fused.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    for grads in grads_after:
        assert all(not grad.any() for grad in grads)  # zeroed by every step
    if flat_gradients:  # backward keeps accumulating into our allocation
        assert optimizers[1].buckets[0][0].gradients.all_ours()


@every_optimizer(cases={"SGD": ("sgd", "nesterov", "sgd-plain")})
def test_a_step_gradscaler_skips_zeroes_the_gradients_too(name, options):
    param = nn.Parameter(torch.randn(4))
    optimizer = OPTIMIZERS[name].cls([param], **options, fused_zero_grad=True)
    state = {key: value.clone() for key, value in optimizer.state[param].items()}
    param.grad = torch.tensor([1.0, float("inf"), 2.0, 3.0])
    before = param.detach().clone()
    optimizer.found_inf = torch.tensor(1.0)  # as GradScaler.step sets it
    optimizer.step()
    assert torch.equal(param.detach(), before)
    assert not param.grad.any()
    assert optimizer.state[param].keys() == state.keys()  # no state made (Adagrad: kept)
    assert all(torch.equal(optimizer.state[param][key], state[key]) for key in state)


@every_optimizer(cases={"SGD": ("sgd", "nesterov", "sgd-plain")})
def test_without_the_option_a_step_never_writes_a_gradient(name, options):
    param = nn.Parameter(torch.randn(4))
    optimizer = OPTIMIZERS[name].cls([param], **options)
    param.grad = torch.randn(4)
    kept = param.grad.clone()
    optimizer.step()
    assert torch.equal(param.grad, kept)
