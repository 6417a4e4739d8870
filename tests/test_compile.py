"""torch.compile: compiled models train with our optimizers; a compiled step runs eagerly."""

import copy

import pytest
import torch
from torch import nn

import fastmomentum

from .assertions import RTOL, assert_relative_close


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))


def data(steps=6):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator))
        for _ in range(steps)
    ]


def assert_same_params(model, ref_model):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_relative_close(p.detach(), q.detach(), RTOL["float32"], "param")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_model_trains_with_our_optimizer():
    model, ref_model = tiny_model(), tiny_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-2, foreach=False)
    compiled, ref_compiled = torch.compile(model), torch.compile(ref_model)
    for inputs, targets in data():
        for net, opt in ((compiled, optimizer), (ref_compiled, ref_optimizer)):
            opt.zero_grad()
            nn.functional.mse_loss(net(inputs), targets).backward()
            opt.step()
    assert_same_params(model, ref_model)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_compiled_training_step_runs_our_step_eagerly(name):
    options = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
    ref_optimizer = getattr(torch.optim, name)(ref_model.parameters(), foreach=False, **options)

    @torch.compile(backend="eager")  # the tracing is what matters here, not codegen
    def train_step(inputs, targets):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss

    for inputs, targets in data():
        train_step(inputs, targets)
        ref_optimizer.zero_grad()
        nn.functional.mse_loss(ref_model(inputs), targets).backward()
        ref_optimizer.step()
    assert_same_params(model, ref_model)
