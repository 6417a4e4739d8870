"""Two-process data-parallel runs for test_distributed (gloo on loopback).

Each rank trains on its half of every batch, in every case: DDP with our optimizers
(with and without ``gradient_as_bucket_view``, both ``zero_grad`` modes), and
``ZeroRedundancyOptimizer`` with our classes and with torch.optim's as
``optimizer_class``, with and without ``parameters_as_bucket_view``. Rank 0 saves the
final parameters of each case, and then every rank leaves without tearing gloo down
(torch 2.13's gloo teardown aborts now and then, even with torch.optim alone).
"""

import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastmomentum

STEPS, BATCH = 12, 16
OPTIONS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Adam": {"lr": 1e-2, "amsgrad": True}}
CASES = [  # (name, optimizer, gradient_as_bucket_view, set_to_none)
    ("ddp-sgd", "SGD", False, True),
    ("ddp-sgd-bucket-view", "SGD", True, False),
    ("ddp-adam-bucket-view", "Adam", True, True),
    ("ddp-adam", "Adam", False, False),
]


def make_model():
    """No BatchNorm: per-rank batch statistics would differ from the full batch's."""
    torch.manual_seed(0)
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


def worker(rank, world, folder, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for case, name, bucket_view, set_to_none in CASES:
        model = DistributedDataParallel(make_model(), gradient_as_bucket_view=bucket_view)
        optimizer = getattr(fastmomentum, name)(model.parameters(), **OPTIONS[name])
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
    dist.barrier()
    os._exit(0)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
