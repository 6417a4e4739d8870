"""Two-process DDP runs for test_ddp_backward (gloo on loopback, `distributed_run.launch`).

Every scenario trains the same model twice in each rank, on that rank's share of every
batch: DDP with ``step_in_backward=True`` and `fastmomentum.ddp.step_after_all_reduce`
("ours"), and DDP without a hook with the ordinary loop ``backward(); step();
zero_grad()`` ("reference"). Each rank saves, per scenario, both runs' parameters and
optimizer states and what the test checks besides; then it leaves without gloo's
teardown (`distributed_run.leave`). One launch runs every scenario: starting processes
and compiling kernels cost more than the scenarios.
"""

import collections
import contextlib
import os
import threading
import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastmomentum
from fastmomentum import ddp

from . import distributed_run

STEPS, BATCH, MICRO = 5, 8, 3
#: About 10 KB: DDP makes several buckets of this model after its first iteration.
BUCKET_CAP_MB = 0.01
ADAMW = {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}


def make_model():
    """Three layers; the middle one (16384 weights) is large enough for the threaded
    kernels, so a step from gloo's thread runs Numba's thread pool too."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 4)
    )


class Branches(nn.Module):
    """For ``find_unused_parameters``: ``left`` is used in rank 0 only (rank 1 gets its
    averaged gradient from DDP at its end of backward), ``unused`` by no rank."""

    def __init__(self, rank):
        super().__init__()
        torch.manual_seed(0)
        self.rank = rank
        self.trunk, self.left, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.right = nn.Linear(16, 4)

    def forward(self, inputs):
        hidden = torch.tanh(self.trunk(inputs))
        out = self.right(hidden)
        return out + self.left(hidden) if self.rank == 0 else out


def batches(rank, world, count):
    """``count`` batches, this rank's share of each: different data per rank."""
    generator = torch.Generator().manual_seed(1)
    share = BATCH // world
    for _ in range(count):
        inputs, targets = (
            torch.randn(BATCH, 8, generator=generator),
            torch.randn(BATCH, 4, generator=generator),
        )
        yield inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]


def loss_of(model, batch):
    dtype = next(model.parameters()).dtype
    inputs, targets = (values.to(dtype) for values in batch)
    return nn.functional.mse_loss(model(inputs), targets)


def train(model, optimizer, scheduler, rank, world, ours, accumulate=None):
    """``STEPS`` iterations. ``accumulate``: None (one backward each), ``"no_sync"``,
    ``"no_sync+no_step"`` or ``"no_step"`` (``MICRO`` backwards each; ``no_step`` only
    applies to ours). Ours runs backward alone, with a harmless ``step(); zero_grad()``
    every other iteration; the reference the ordinary loop. Returns, for ours, whether
    every gradient was None after each stepping backward."""
    freed = []
    micro = 1 if accumulate is None else MICRO
    data = batches(rank, world, STEPS * micro)
    for step in range(STEPS):
        for k in range(micro):
            with _accumulating(model, optimizer, accumulate, ours, last=k == micro - 1):
                loss_of(model, next(data)).backward()
        if ours:
            freed.append(all(p.grad is None for p in model.parameters()))
            if step % 2:
                optimizer.step()
                optimizer.zero_grad()
        else:
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    return freed


def _accumulating(model, optimizer, accumulate, ours, last):
    contexts = contextlib.ExitStack()
    if last or accumulate is None:
        return contexts
    if "no_sync" in accumulate:
        contexts.enter_context(model.no_sync())
    if "no_step" in accumulate and ours:
        contexts.enter_context(optimizer.no_step())
    return contexts


def scenario(rank, world, name, options, accumulate=None, ddp_options=None, module=make_model):
    """One scenario: ours and the reference, each from the same initial model."""
    return {
        "ours" if ours else "reference": run_once(
            rank, world, name, options, accumulate, ddp_options or {}, module, ours
        )
        for ours in (True, False)
    }


def run_once(rank, world, name, options, accumulate, ddp_options, module, ours):
    """Train one DDP model; its parameters, state and what the test checks besides."""
    model = DistributedDataParallel(module(), bucket_cap_mb=BUCKET_CAP_MB, **ddp_options)
    optimizer = getattr(fastmomentum, name)(model.parameters(), step_in_backward=ours, **options)
    calls = count_step_hooks(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    state = ddp.step_after_all_reduce(model, optimizer) if ours else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freed = train(model, optimizer, scheduler, rank, world, ours, accumulate)
    main = threading.main_thread().ident
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": optimizer.state_dict(),
        "hooks": dict(calls),
        "freed": freed,
        "warnings": [str(w.message) for w in caught if "lr_scheduler" in str(w.message)],
        "off_main_thread": None if state is None else bool(state.threads - {main}),
    }


def count_step_hooks(optimizer):
    """How often ``optimizer``'s step pre- and post-hooks run."""
    calls = collections.Counter(pre=0, post=0)
    optimizer.register_step_pre_hook(lambda *_: calls.update(["pre"]))
    optimizer.register_step_post_hook(lambda *_: calls.update(["post"]))
    return calls


def refused(rank, world):
    """Without `step_after_all_reduce`: the error at the first backward, nothing moved."""
    model = DistributedDataParallel(make_model(), bucket_cap_mb=BUCKET_CAP_MB)
    optimizer = fastmomentum.AdamW(model.parameters(), step_in_backward=True, **ADAMW)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        loss_of(model, next(batches(rank, world, 1))).backward()
        message = None
    except RuntimeError as error:
        message = str(error)
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return {"message": message, "unchanged": unchanged, "state": len(optimizer.state)}


def step_after_no_sync(rank, world):
    """``optimizer.step()`` after a backward inside DDP's ``no_sync()`` (gradients this
    process's own, never all-reduced): refused, nothing moved."""
    model = DistributedDataParallel(make_model(), bucket_cap_mb=BUCKET_CAP_MB)
    optimizer = fastmomentum.AdamW(model.parameters(), step_in_backward=True, **ADAMW)
    ddp.step_after_all_reduce(model, optimizer)
    first, second = batches(rank, world, 2)
    loss_of(model, first).backward()  # learns the order, steps
    with model.no_sync():
        loss_of(model, second).backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        optimizer.step()
        message = None
    except RuntimeError as error:
        message = str(error)
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return {"message": message, "unchanged": unchanged}


def checks():
    """`step_after_all_reduce`'s ValueErrors, before anything is registered."""
    model = DistributedDataParallel(make_model())
    plain = make_model()
    cases = {
        "not-ddp": (plain, fastmomentum.AdamW(plain.parameters(), step_in_backward=True)),
        "not-in-backward": (model, fastmomentum.AdamW(model.parameters())),
        "missing": (model, fastmomentum.AdamW(list(model.parameters())[1:], step_in_backward=True)),
        "extra": (
            model,
            fastmomentum.AdamW(
                [*model.parameters(), nn.Parameter(torch.ones(2))], step_in_backward=True
            ),
        ),
    }
    messages = {}
    for case, (candidate, optimizer) in cases.items():
        try:
            ddp.step_after_all_reduce(candidate, optimizer)
            messages[case] = None
        except ValueError as error:
            messages[case] = str(error)
        messages[case + "-by_ddp"] = optimizer.steps_in_backward and optimizer._backward.by_ddp
    return messages


SCENARIOS = {  # name: (optimizer, options, accumulate, DDP options, module)
    "adamw": ("AdamW", ADAMW, None, {}, None),
    "sgd-bucket-view": ("SGD", SGD, None, {"gradient_as_bucket_view": True}, None),
    "adamw-no-sync": ("AdamW", ADAMW, "no_sync", {}, None),
    "sgd-no-sync-no-step": ("SGD", SGD, "no_sync+no_step", {}, None),
    "adamw-no-step": ("AdamW", ADAMW, "no_step", {}, None),
    "adamw-static-graph": ("AdamW", ADAMW, None, {"static_graph": True}, None),
    "adamw-find-unused": ("AdamW", ADAMW, None, {"find_unused_parameters": True}, "branches"),
    # LAMB's sums of squares over a table DDP's bucket cuts in other places than the
    # ordinary step's, in float64 (bench/NOTES.md entry 33)
    "lamb-float64": ("LAMB", {"lr": 1e-2, "weight_decay": 0.01}, None, {}, "float64"),
}


def worker(rank, world, meeting, folder):
    distributed_run.join_group(rank, world, meeting)
    results = {}
    for case, (name, options, accumulate, ddp_options, module) in SCENARIOS.items():
        make = {
            "branches": lambda: Branches(rank),
            "float64": lambda: make_model().double(),
        }.get(module, make_model)
        results[case] = scenario(rank, world, name, options, accumulate, ddp_options, make)
    results["refused"] = refused(rank, world)
    results["checks"] = checks()
    results["step-after-no-sync"] = step_after_no_sync(rank, world)
    torch.save(results, os.path.join(folder, f"ddp-backward-{rank}.pt"))
    distributed_run.leave(rank, meeting)
