"""Twin optimizers for the fidelity tests: the same float64 parameters under torch.optim's
optimizer and ours, stepped with the same random gradients and compared at `TOLERANCE`
(1e-12 relative; observed ≈1e-16)."""

import torch

import fastmomentum

from .assertions import RTOL, assert_relative_close

TOLERANCE = RTOL["float64"]

SGD = ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})
ADAM = ("Adam", {"lr": 0.05, "weight_decay": 0.01})
AMSGRAD = ("Adam", {"lr": 0.05, "amsgrad": True})
ADAMW = ("AdamW", {"lr": 0.05})


class Twins:
    """The same parameters under torch.optim's optimizer and ours."""

    def __init__(self, name, options, shapes=((5, 3), (4,)), seed=0, arrange=None):
        generator = torch.Generator().manual_seed(seed)
        values = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        self.theirs = [v.clone().requires_grad_() for v in values]
        self.ours = [v.clone().requires_grad_() for v in values]
        arrange = arrange or (lambda params: params)
        self.torch = getattr(torch.optim, name)(arrange(self.theirs), **options)
        self.fast = getattr(fastmomentum, name)(arrange(self.ours), **options)
        self.generator = torch.Generator().manual_seed(seed + 1)

    @property
    def optimizers(self):
        return (self.torch, self.fast)

    def pairs(self):
        """(torch's optimizer, its parameters), then ours."""
        return ((self.torch, self.theirs), (self.fast, self.ours))

    def step(self, times=3):
        for _ in range(times):
            for theirs, ours in zip(self.theirs, self.ours):
                grad = torch.randn(theirs.shape, generator=self.generator, dtype=torch.float64)
                theirs.grad, ours.grad = grad.clone(), grad.clone()
            self.torch.step()
            self.fast.step()

    def assert_same(self):
        for index, (theirs, ours) in enumerate(zip(self.theirs, self.ours)):
            assert_relative_close(ours.detach(), theirs.detach(), TOLERANCE, f"parameter {index}")
