"""The two momentum conventions: equal under a constant lr, apart when lr changes."""

import pytest
import torch

import fastmomentum

from .assertions import RTOL, assert_relative_close
from .models import make_model, train


def run(convention, schedule=None, steps=60):
    model = make_model()
    optimizer = fastmomentum.SGD(
        model.parameters(), lr=0.05, momentum=0.9, momentum_convention=convention
    )
    scheduler = schedule(optimizer) if schedule else None
    train(model, optimizer, steps, scheduler=scheduler)
    return model, optimizer


def step_decay(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.1)


def test_conventions_agree_while_lr_is_constant():
    torch_model, torch_optimizer = run("pytorch")
    folded_model, folded_optimizer = run("lr_folded")
    for p, q in zip(folded_model.parameters(), torch_model.parameters()):
        assert_relative_close(p.detach(), q.detach(), 1e-10, "param")
        # the folded velocity carries the learning rate: v_folded = lr · v_pytorch
        assert_relative_close(
            folded_optimizer.state[p]["momentum_buffer"],
            0.05 * torch_optimizer.state[q]["momentum_buffer"],
            1e-10,
            "velocity",
        )


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_conventions_differ_when_lr_changes_and_folded_follows_its_formula():
    torch_model, _ = run("pytorch", step_decay)
    folded_model, _ = run("lr_folded", step_decay)
    difference = max(
        ((p - q).abs().max() / q.abs().max()).item()
        for p, q in zip(folded_model.parameters(), torch_model.parameters())
    )
    assert difference > 1e-3, "a step decay must separate the conventions"

    # The lr-folded rule written out with torch ops: v ← μ·v + lr·g; p ← p − v.
    model = make_model()
    velocities = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # only carries lr for StepLR
    scheduler = step_decay(optimizer)

    class Folded:
        def zero_grad(self, set_to_none=True):
            optimizer.zero_grad(set_to_none)

        def step(self):
            lr = optimizer.param_groups[0]["lr"]
            with torch.no_grad():
                for param in model.parameters():
                    update = lr * param.grad
                    if param in velocities:
                        velocities[param].mul_(0.9).add_(update)
                    else:
                        velocities[param] = update.clone()
                    param.sub_(velocities[param])

    train(model, Folded(), 60, scheduler=scheduler)
    for p, q in zip(folded_model.parameters(), model.parameters()):
        assert_relative_close(p.detach(), q.detach(), RTOL["float64"], "param")
