"""Two-process FSDP2 runs for test_fsdp (gloo on loopback, CPU).

``train`` phase: every case shards the model with ``fully_shard`` and trains it with our
optimizer, each rank on its half of every batch; halfway it saves model and optimizer
with ``torch.distributed.checkpoint``. ``resume`` phase, in a fresh process group:
each case loads that checkpoint into a new model and optimizer and trains the second
half. Two cases keep 8-bit state (blocks within each shard; a wider hidden layer gives
its weight's shards 2 and 1 blocks). Rank 0 saves what the test compares, then every
rank leaves without tearing gloo down (torch 2.13's gloo teardown aborts now and then,
even with torch.optim alone).
Each phase is one ``distributed_run.launch``: a rendezvous file, a deadline.
"""

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import fastmomentum
from fastmomentum import backward as steps_in_backward
from fastmomentum import quantized
from fastmomentum.kernels import quantization

from . import distributed_run

STEPS, RESUME_AT = 8, 4
OPTIONS = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "Adam": {"lr": 1e-2, "amsgrad": True},
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1},
    "NAdam": {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True},
    "RMSprop": {"lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 1e-2},
    "Adagrad": {"lr": 0.05, "lr_decay": 1e-3, "initial_accumulator_value": 0.1},
    "LAMB": {"lr": 1e-2, "weight_decay": 0.01},
}
CASES = [  # (name, optimizer, reshard_after_forward)
    ("sgd-reshard", "SGD", True),
    ("sgd-keep", "SGD", False),
    ("adam-reshard", "Adam", True),
    ("adamw-keep", "AdamW", False),
    ("adamw-bf16-master", "AdamW", True),
    ("nadam-keep", "NAdam", False),
    ("rmsprop-reshard", "RMSprop", True),
    ("adagrad-keep", "Adagrad", False),
    ("lamb-reshard", "LAMB", True),  # trust ratios of whole tensors: sums across ranks
    ("adamw-int8-reshard", "AdamW", True),
    ("adagrad-int8-keep", "Adagrad", False),
]
#: Cases trained once more with ``step_in_backward=True`` in the train phase: FSDP2 calls
#: a sharded parameter's post-accumulate-grad hooks once its gradient is reduced, so the
#: buckets step inside backward; the result must be the ordinary loop's bit for bit.
IN_BACKWARD = ("sgd-reshard", "adamw-keep", "lamb-reshard", "adamw-int8-reshard")
#: Cases on bfloat16 parameters, with these options on top of ``OPTIONS``.
BFLOAT16_CASES = {"adamw-bf16-master": {"master_weights": True}}
#: Cases on float32 parameters with 8-bit state, on a model with a hidden layer of 33.
INT8_CASES = ("adamw-int8-reshard", "adagrad-int8-keep")


def case_options(case, name):
    if case in INT8_CASES:
        return {**OPTIONS[name], "state_dtype": "int8_blockwise"}
    return {**OPTIONS[name], **BFLOAT16_CASES.get(case, {})}


def case_dtype(case):
    if case in INT8_CASES:
        return torch.float32
    return torch.bfloat16 if case in BFLOAT16_CASES else torch.float64


def case_model(case):
    """The model a case trains (before sharding), the same in every process."""
    return make_model(case_dtype(case), hidden=33 if case in INT8_CASES else 16)


def make_model(dtype=torch.float64, hidden=16):
    """Uneven shards on purpose: the last weight has 5 rows for 2 ranks (with
    ``hidden=33`` the middle one 33 rows of 16: 17 rows for rank 0, 2 blocks of 256
    elements, and 16 for rank 1, one block)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 5)
    ).to(dtype)


def train(model, optimizer, rank, world, steps):
    """Steps ``steps`` of the DDP tests' regression (5 outputs), each rank on its share."""
    distributed_run.train(model, optimizer, rank, world, steps=steps, outputs=5)


def sharded(case, reshard):
    model = case_model(case)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, reshard_after_forward=reshard)
    return fully_shard(model, reshard_after_forward=reshard)


def worker(rank, world, meeting, folder, phase):
    distributed_run.join_group(rank, world, meeting)
    results = {}
    for case, name, reshard in CASES:
        model = sharded(case, reshard)
        local_memory = [p.to_local().data_ptr() for p in model.parameters()]
        options = case_options(case, name)
        optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
        checkpoint = os.path.join(folder, case)
        if phase == "train":
            train(model, optimizer, rank, world, range(RESUME_AT))
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)
        else:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)
            set_state_dict(
                model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
            )
        train(model, optimizer, rank, world, range(RESUME_AT, STEPS))
        results[case] = [p.full_tensor().detach().clone() for p in model.parameters()]
        # FSDP's own shard storage was stepped in place, never re-pointed
        results[case + "-in-place"] = local_memory == [
            p.to_local().data_ptr() for p in model.parameters()
        ]
        state = optimizer.state[next(model.parameters())]
        results[case + "-state-kinds"] = sorted(  # scalars (step, mu_product) stay plain
            type(value).__name__
            for key, value in state.items()
            if key not in optimizer.scalar_state
        )
        if phase == "train":
            results[case + "-full-load"] = load_full_state(model, optimizer, name, options)
        if case in INT8_CASES:
            results[case + "-decoded"] = decoded_state(model, optimizer, name)
    if phase == "train":
        results["errors"] = bad_placements()
        for case, name, reshard in CASES:
            if case in IN_BACKWARD:
                results[case + "-in-backward"] = in_backward(case, name, reshard, rank, world)
    if rank == 0:
        torch.save(results, os.path.join(folder, f"{phase}.pt"))
    distributed_run.leave(rank, meeting)


def in_backward(case, name, reshard, rank, world):
    """The case trained ``STEPS`` steps with ``step_in_backward=True`` and buckets of 256
    bytes (one or two parameters each): its parameters, full, and whether the last
    backward stepped every bucket inside it (no gradient left)."""
    steps_in_backward.BUCKET_BYTES = 256
    model = sharded(case, reshard)
    options = {**case_options(case, name), "step_in_backward": True}
    optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
    train(model, optimizer, rank, world, range(STEPS))  # its step() and zero_grad(): no-ops
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    return params, len(optimizer.buckets[0]), all(p.grad is None for p in model.parameters())


def load_full_state(model, optimizer, name, options):
    """A state dict of full tensors (``full_tensor()`` of every DTensor) loaded into a new
    optimizer: each rank takes its shard, so the state equals the original's."""
    saved = optimizer.state_dict()
    scalars = optimizer.scalar_state  # step, NAdam's mu_product: plain tensors
    for entry in saved["state"].values():
        for key, value in entry.items():
            if key not in scalars:
                entry[key] = value.full_tensor()
    fresh = getattr(fastmomentum, name)(model.parameters(), **options)
    fresh.load_state_dict(saved)
    return all(
        torch.equal(fresh.state[p][key].to_local(), value.to_local())
        for p in model.parameters()
        for key, value in optimizer.state[p].items()
        if key not in scalars
    )


def decoded_state(model, optimizer, name):
    """Whether an 8-bit state dict decoded (`fastmomentum.dequantized_state_dict`: each
    shard's codes on that shard's absmax) loads into float32 state, each state tensor
    the float32 values of this rank's codes; and whether each absmax has as many values
    as the largest shard has blocks, 0 past this shard's own."""
    decoded = fastmomentum.dequantized_state_dict(optimizer.state_dict())
    full = getattr(fastmomentum, name)(model.parameters(), **OPTIONS[name])
    full.load_state_dict(decoded)
    right = True
    for param in model.parameters():
        state, here = optimizer.state[param], param.to_local().numel()
        for moment in (m for m in quantized.MOMENTS if f"{m}_codes" in state):
            codes, absmax = state[f"{moment}_codes"], state[f"{moment}_absmax"]
            blocks = quantization.blocks(here)
            values = quantized.dequantize_moment(codes.to_local(), absmax.to_local()[:blocks])
            right &= torch.equal(full.state[param][moment].to_local(), values)
            right &= absmax.shape == (dist.get_world_size() * quantized.absmax_length(param),)
            right &= bool((absmax.to_local()[blocks:] == 0).all())
            right &= absmax.to_local().numel() == quantized.absmax_length(param)
    return right


def bad_placements():
    """The errors for a ``Partial`` parameter and a gradient placed unlike its parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    errors = {}
    partial = nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Partial()]))
    try:
        fastmomentum.SGD([partial], lr=0.1)
    except ValueError as error:
        errors["partial"] = str(error)
    param = nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Shard(0)]))
    optimizer = fastmomentum.Adam([param])
    param.grad = DTensor.from_local(torch.randn(8), mesh, [Replicate()])
    before = param.to_local().clone()
    try:
        optimizer.step()
    except ValueError as error:
        errors["grad"] = str(error)
    errors["unchanged"] = torch.equal(before, param.to_local()) and len(optimizer.state) == 0
    return errors
