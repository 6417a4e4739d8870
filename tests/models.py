"""A small real model and a seeded training loop, shared by the optimizer tests."""

import copy

import torch
from torch import nn

import fastmomentum


class SmallNet(nn.Module):
    """Embedding, Conv1d, BatchNorm, LayerNorm and Linear layers: ≈1.4k parameters."""

    def __init__(self, vocabulary=32, width=8, channels=16, outputs=4):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        # no conv bias: BatchNorm right after it would cancel its gradient to rounding noise
        self.conv = nn.Conv1d(width, channels, kernel_size=3, padding=1, bias=False)
        self.batch_norm = nn.BatchNorm1d(channels)
        self.layer_norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, outputs)

    def forward(self, tokens):
        x = self.embedding(tokens).transpose(1, 2)
        x = torch.tanh(self.batch_norm(self.conv(x)))
        x = self.layer_norm(x.transpose(1, 2)).mean(dim=1)
        return self.head(x)


class TinyNet(nn.Module):
    """Embedding and two Linear layers: 204 parameters in five tensors of 4 to 128
    elements, for tests that step in Numba's CUDA simulator (Python per element)."""

    def __init__(self, vocabulary=32, width=4, hidden=8, outputs=4):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.hidden = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embedding(tokens).mean(dim=1))))


def make_model(dtype=torch.float64, seed=0, tiny=False):
    """`SmallNet`, or with ``tiny`` `TinyNet` (same inputs and outputs), in ``dtype``."""
    torch.manual_seed(seed)
    return (TinyNet() if tiny else SmallNet()).to(dtype)


def batches(steps, dtype=torch.float64, seed=1, batch=16, length=12):
    """``steps`` random (tokens, targets) pairs, the same for every caller with this seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 32, (batch, length), generator=generator)
        targets = torch.randn(batch, 4, generator=generator, dtype=dtype)
        yield tokens, targets


def train(model, optimizer, steps, dtype=torch.float64, scheduler=None, set_to_none=True, first=0):
    """Train on batches ``first`` to ``steps − 1`` of MSE regression on random data (a
    resumed run passes ``first``); returns the losses."""
    losses = []
    for step, (tokens, targets) in enumerate(batches(steps, dtype)):
        if step < first:
            continue
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.mse_loss(model(tokens), targets)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def twins(name, options, model):
    """(our optimizer on ``model``, torch's on a deep copy of it, that copy)."""
    ref_model = copy.deepcopy(model)
    ours = getattr(fastmomentum, name)(model.parameters(), **options)
    theirs = getattr(torch.optim, name)(ref_model.parameters(), foreach=False, **options)
    return ours, theirs, ref_model


def backward(model, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (8, 12), generator=generator)
    targets = torch.randn(8, 4, generator=generator, dtype=dtype)
    loss = nn.functional.mse_loss(model(tokens), targets)
    loss.backward()
    return loss
