"""Two-process data-parallel runs for test_distributed (gloo on loopback).

Each rank trains on its half of every batch, in every case: DDP with our optimizers
(with and without ``gradient_as_bucket_view``, both ``zero_grad`` modes), and
``ZeroRedundancyOptimizer`` with our classes and with torch.optim's as
``optimizer_class``, with and without ``parameters_as_bucket_view``. Rank 0 saves the
final parameters of each case, and then every rank leaves without tearing gloo down
(torch 2.13's gloo teardown aborts now and then, even with torch.optim alone).

Every multi-process run of the tests (this one and ``fsdp_run``'s phases) goes through
:func:`launch` in the test process and :func:`join_group` / :func:`leave` in its workers.

- **No port is picked in advance.** The ranks meet through a file (``init_method="file://…"``,
  torch's ``FileStore``) in a folder made for that launch. Probing a free port and binding it
  later is a race (another process may take the port in between); nothing here is bound
  before use: gloo's own connections between the ranks bind port 0, so the kernel picks
  them at bind time. We prefer the file to a ``TCPStore(port=0)`` hosted by the test
  process (race-free too) because nothing has to stay alive in the test process, no
  server thread has to be closed on every path, and a failure leaves only a file in the
  test's temporary folder. A fresh folder per launch matters: a FileStore is an
  append-only log, and a file left by an earlier group would hand its keys to the next.
- **Every launch has a deadline** (:data:`DEADLINE`); ranks still running then are
  killed (SIGKILL) and the test fails naming the launch.
- **A rank has finished once it has marked so** (:func:`leave`, after its results are
  saved and every rank has passed the last barrier). A rank that crashes after that, in
  teardown, does not fail the test; one that fails or exits before it does.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastmomentum

#: Seconds one launch may take, from starting its processes to the last one's exit.
#: Measured on the 2-core machine: this module's run 11 s and an FSDP phase about 12 s
#: when idle with a warm Numba cache; 53 s for each with an empty cache (every kernel
#: compiled in both ranks) at a load average of 9. A loaded machine runs 2-9x slower than
#: an idle one, so ten minutes is generous for any of that, and still finite: a hung rank
#: fails its test instead of the whole run.
DEADLINE = 600
#: Seconds the other ranks get to exit by themselves once one has failed (then SIGTERM,
#: as long again, then SIGKILL: ``ProcessContext.join``).
GRACE = 20

STEPS, BATCH = 12, 16
#: The optimizers of the ZeRO runs, and of the DDP runs with the others below.
OPTIONS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Adam": {"lr": 1e-2, "amsgrad": True}}
#: Every other optimizer under DDP (`fastmomentum.capabilities` claims each).
DDP_OPTIONS = OPTIONS | {
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1},
    "NAdam": {"lr": 1e-2, "weight_decay": 1e-2},
    "RAdam": {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True},
    "Adamax": {"lr": 1e-2, "weight_decay": 1e-2},
    "RMSprop": {"lr": 1e-3, "momentum": 0.9, "centered": True},
    "Adagrad": {"lr": 0.05, "lr_decay": 1e-3},
    "LAMB": {"lr": 1e-2, "weight_decay": 1e-2},
    "Lion": {"lr": 1e-3, "weight_decay": 1e-2},
    "Muon": {"lr": 2e-2, "weight_decay": 0.1},
}
CASES = [  # (name, optimizer, gradient_as_bucket_view, set_to_none)
    ("ddp-sgd", "SGD", False, True),
    ("ddp-sgd-bucket-view", "SGD", True, False),
    ("ddp-adam-bucket-view", "Adam", True, True),
    ("ddp-adam", "Adam", False, False),
    ("ddp-adamw-bucket-view", "AdamW", True, True),
    ("ddp-nadam", "NAdam", False, True),
    ("ddp-radam-bucket-view", "RAdam", True, False),
    ("ddp-adamax", "Adamax", False, True),
    ("ddp-rmsprop", "RMSprop", False, True),
    ("ddp-adagrad-bucket-view", "Adagrad", True, False),
    ("ddp-lamb", "LAMB", False, True),
    ("ddp-lion-bucket-view", "Lion", True, False),
    ("ddp-muon", "Muon", True, True),  # a matrices-only model (`make_model`)
]


def make_model(name=None):
    """No BatchNorm: per-rank batch statistics would differ from the full batch's. For
    Muon, which steps matrices only, no bias nor LayerNorm."""
    torch.manual_seed(0)
    if name == "Muon":
        return nn.Sequential(
            nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False)
        ).double()
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4)).double()


def batches(steps=STEPS, outputs=4):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (
            torch.randn(BATCH, 8, generator=generator, dtype=torch.float64),
            torch.randn(BATCH, outputs, generator=generator, dtype=torch.float64),
        )


def train(model, optimizer, rank, world, set_to_none=True, steps=range(STEPS), outputs=4):
    """Steps ``steps`` of MSE regression, each rank on its share of every batch."""
    share = BATCH // world
    for step, (inputs, targets) in enumerate(batches(steps.stop, outputs)):
        if step in steps:
            part = slice(rank * share, (rank + 1) * share)
            optimizer.zero_grad(set_to_none=set_to_none)
            outputs = model(inputs[part].to(next(model.parameters()).dtype))
            nn.functional.mse_loss(outputs.double(), targets[part]).backward()
            optimizer.step()


def worker(rank, world, meeting, folder):
    join_group(rank, world, meeting)
    results = {}
    for case, name, bucket_view, set_to_none in CASES:
        model = DistributedDataParallel(make_model(name), gradient_as_bucket_view=bucket_view)
        optimizer = getattr(fastmomentum, name)(model.parameters(), **DDP_OPTIONS[name])
        train(model, optimizer, rank, world, set_to_none)
        results[case] = [p.detach().clone() for p in model.parameters()]
    for name in OPTIONS:
        for bucket_view in (False, True):
            for library in (fastmomentum, torch.optim):
                model = make_model()
                optimizer = ZeroRedundancyOptimizer(
                    model.parameters(),
                    optimizer_class=getattr(library, name),
                    parameters_as_bucket_view=bucket_view,
                    **OPTIONS[name],
                )
                train(model, optimizer, 0, 1)  # every rank the full batch: ZeRO shards state
                case = f"zero-{name}-{library.__name__}" + ("-bucket-view" if bucket_view else "")
                results[case] = [p.detach().clone() for p in model.parameters()]
                if bucket_view:  # the parameters still live in ZeRO's buckets
                    buckets = {b.data_ptr() for device in optimizer._buckets for b in device}
                    results[case + "-in-buckets"] = all(
                        p.untyped_storage().data_ptr() in buckets for p in model.parameters()
                    )
    if rank == 0:
        torch.save(results, os.path.join(folder, "distributed.pt"))
    leave(rank, meeting)


def launch(worker, folder, *args, what, world=2, deadline=DEADLINE):
    """Runs ``worker(rank, world, meeting, folder, *args)`` in ``world`` new processes
    (spawned) and returns once every rank has finished (:func:`leave`).

    ``meeting`` is a fresh folder under ``folder`` for this launch's rendezvous file and
    the ranks' marks. Fails the test, naming ``what``, when a rank fails or exits before it
    has finished, or when ``deadline`` seconds pass first; no process outlives the call.
    """
    meeting = tempfile.mkdtemp(prefix="meeting-", dir=folder)
    context = mp.start_processes(
        worker, args=(world, meeting, str(folder), *args), nprocs=world, join=False
    )
    end = time.monotonic() + deadline
    try:
        while True:
            try:
                if context.join(timeout=max(0.0, end - time.monotonic()), grace_period=GRACE):
                    break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
                if len(finished(meeting, world)) == world:
                    return  # a crash in teardown, after every rank had finished
                pytest.fail(f"{what}: {error}")
            if time.monotonic() >= end:
                running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                pytest.fail(
                    f"{what}: rank(s) {running} still running after {deadline} s: killed"
                    f" (ranks finished: {sorted(finished(meeting, world))})"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    missing = sorted(set(range(world)) - finished(meeting, world))
    if missing:
        pytest.fail(f"{what}: rank(s) {missing} exited without finishing (leave())")


def finished(meeting, world):
    return {rank for rank in range(world) if Path(meeting, f"rank-{rank}.finished").exists()}


def join_group(rank, world, meeting):
    """Joins this launch's gloo group: the ranks meet through a file (no port; see above)."""
    rendezvous = os.path.join(os.path.abspath(meeting), "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def leave(rank, meeting):
    """Ends a rank whose results are saved: a barrier (no rank is still in a collective),
    then its mark, then ``os._exit`` without gloo's teardown (torch 2.13's aborts now and
    then, even with torch.optim alone)."""
    dist.barrier()
    Path(meeting, f"rank-{rank}.finished").touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
