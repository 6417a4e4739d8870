"""Two-process FSDP2 runs for test_fsdp (gloo on loopback, CPU).

``train`` phase: every case shards the model with ``fully_shard`` and trains it with our
optimizer, each rank on its half of every batch; halfway it saves model and optimizer
with ``torch.distributed.checkpoint``. ``resume`` phase, in a fresh process group:
each case loads that checkpoint into a new model and optimizer and trains the second
half. Two cases keep 8-bit state (blocks within each shard; a wider hidden layer gives
its weight's shards 2 and 1 blocks). The rounding cases train bfloat16 parameters with
stochastic rounding or Kahan summation, record the whole gradients of every step (for
the test to step the unsharded model with) and what each shard adds to its random key;
the resume phase makes their optimizers with another seed than the checkpoint's. Rank
0 saves what the test compares, then every rank leaves without tearing gloo down (torch
2.13's gloo teardown aborts now and then, even with torch.optim alone).
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
    "RAdam": {"lr": 1e-2, "weight_decay": 1e-2},
    "Adamax": {"lr": 1e-2, "weight_decay": 1e-2},
    "RMSprop": {"lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 1e-2},
    "Adagrad": {"lr": 0.05, "lr_decay": 1e-3, "initial_accumulator_value": 0.1},
    "LAMB": {"lr": 1e-2, "weight_decay": 0.01},
    "Lion": {"lr": 1e-3, "weight_decay": 0.01},
    "Muon": {"lr": 2e-2, "weight_decay": 0.1},
}
CASES = [  # (name, optimizer, reshard_after_forward)
    ("sgd-reshard", "SGD", True),
    ("sgd-keep", "SGD", False),
    ("adam-reshard", "Adam", True),
    ("adamw-keep", "AdamW", False),
    ("adamw-bf16-master", "AdamW", True),
    ("nadam-keep", "NAdam", False),
    ("radam-reshard", "RAdam", True),
    ("adamax-keep", "Adamax", False),
    ("rmsprop-reshard", "RMSprop", True),
    ("adagrad-keep", "Adagrad", False),
    ("lamb-reshard", "LAMB", True),  # trust ratios of whole tensors: sums across ranks
    ("adamw-int8-reshard", "AdamW", True),
    ("adagrad-int8-keep", "Adagrad", False),
    ("lion-keep", "Lion", False),
    ("muon-reshard", "Muon", True),  # each U gathered whole: `matrices_model`
]
#: Cases trained once more with ``step_in_backward=True`` in the train phase: FSDP2 calls
#: a sharded parameter's post-accumulate-grad hooks once its gradient is reduced, so the
#: buckets step inside backward; the result must be the ordinary loop's bit for bit.
IN_BACKWARD = (
    "sgd-reshard",
    "adamw-keep",
    "lamb-reshard",
    "adamw-int8-reshard",
    "lion-keep",
    "muon-reshard",
)
#: Cases on bfloat16 parameters, with these options on top of ``OPTIONS``.
BFLOAT16_CASES = {"adamw-bf16-master": {"master_weights": True}}
#: Cases on float32 parameters with 8-bit state, on a model with a hidden layer of 33.
INT8_CASES = ("adamw-int8-reshard", "adagrad-int8-keep")

STOCHASTIC = {"stochastic_rounding": True, "rounding_seed": 7}
KAHAN = {"kahan_sum": True}
#: bfloat16 parameters with stochastic rounding or Kahan summation, their state in
#: bfloat16 (the parameters' dtype) or 8 bits: (name, optimizer, reshard_after_forward).
#: Each is also trained with ``step_in_backward=True``, and the train phase records the
#: whole gradients of every step for the test to step the unsharded model with.
ROUNDING_CASES = [
    ("sgd-stochastic-reshard", "SGD", True),
    ("sgd-kahan-keep", "SGD", False),
    ("sgd-stochastic-int8-keep", "SGD", False),
    ("sgd-kahan-int8-reshard", "SGD", True),
    ("adamw-stochastic-keep", "AdamW", False),
    ("adamw-kahan-reshard", "AdamW", True),
    ("adamw-stochastic-int8-reshard", "AdamW", True),
    ("adamw-kahan-int8-keep", "AdamW", False),
    ("nadam-stochastic-int8-keep", "NAdam", False),
    ("nadam-kahan-reshard", "NAdam", True),
    ("radam-stochastic-int8-reshard", "RAdam", True),
    ("adamax-kahan-int8-keep", "Adamax", False),
    ("lamb-stochastic-reshard", "LAMB", True),  # trust ratios: sums across ranks
    ("lamb-kahan-int8-keep", "LAMB", False),
    ("lion-stochastic-int8-reshard", "Lion", True),
    ("lion-kahan-keep", "Lion", False),
    ("adamw-stochastic-dim1-keep", "AdamW", False),  # Shard(1): see `sharded`
]
#: The rounding cases sharded on dimension 1 (``shard_placement_fn``): their shards are
#: not runs of whole rows, so their random bits are not the unsharded run's (see
#: `fastmomentum.bucket.shard_rounding_shifts`).
DIM1_CASES = ("adamw-stochastic-dim1-keep",)
#: The seed the resume phase gives stochastic-rounding optimizers: the checkpoint's wins.
OTHER_SEED = 99


def rounding(case):
    """A rounding case's options on top of ``OPTIONS`` (``{}`` for the other cases)."""
    if not any(case == c for c, _, _ in ROUNDING_CASES):
        return {}
    options = STOCHASTIC if "-stochastic" in case else KAHAN
    return {**options, "state_dtype": "int8_blockwise" if "-int8" in case else None}


def case_options(case, name):
    if case in INT8_CASES:
        return {**OPTIONS[name], "state_dtype": "int8_blockwise"}
    return {**OPTIONS[name], **BFLOAT16_CASES.get(case, {}), **rounding(case)}


def case_dtype(case):
    if case in INT8_CASES:
        return torch.float32
    return torch.bfloat16 if case in BFLOAT16_CASES or rounding(case) else torch.float64


def case_model(case):
    """The model a case trains (before sharding), the same in every process."""
    if case.startswith("muon"):
        return matrices_model()
    if rounding(case).get("state_dtype") or (rounding(case) and case.startswith("lamb-")):
        return block_aligned_model()
    wide = case in INT8_CASES or rounding(case)
    return make_model(case_dtype(case), hidden=33 if wide else 16)


def block_aligned_model():
    """A bfloat16 model whose shards on 2 ranks are whole 8-bit blocks of the whole
    tensors (no biases; rank 0's shard of each weight is a multiple of 256 elements): its
    8-bit state then has the unsharded run's blocks, so its numbers can be compared bit
    for bit. The last weight has 5 rows of 256: 3 for rank 0, 2 for rank 1.

    The LAMB rounding cases train it too, whatever their state: LAMB's trust ratio
    needs each tensor's ‖p‖² and ‖u‖², which the direction pass sums in float32 over
    chunks of its arrays (64 elements for 16-bit ones, a block of 256 for 8-bit state:
    `kernels.cpu`), each chunk's sum added up in float64; a shard that is whole chunks
    of its tensor sums the unsharded run's chunks, and the ranks' float64 sums add up
    to the unsharded sum (exactly here: float64 adds a few float32 sums of like
    magnitude without rounding). Other shards may put an ulp of float32 into ``r``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 256, bias=False), nn.Tanh(), nn.Linear(256, 5, bias=False)
    ).to(torch.bfloat16)


def matrices_model():
    """`make_model` without biases (Muon steps matrices only): uneven shards too."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(),
        nn.Linear(16, 5, bias=False),
    ).double()  # fmt: skip


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
    from torch.distributed.tensor import Shard

    model = case_model(case)
    options = {"reshard_after_forward": reshard}
    if case in DIM1_CASES:  # weights on dimension 1 where even (FSDP2 wants it even)
        options["shard_placement_fn"] = lambda p: Shard(int(p.dim() == 2 and p.shape[1] % 2 == 0))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **options)
    return fully_shard(model, **options)


def record_gradients(model, optimizer):
    """A list that gains, at each step of ``optimizer``, the whole gradient of every
    parameter (``full_tensor()``, on every rank: a collective), before the step."""
    recorded = []

    def record(*_):
        recorded.append([p.grad.full_tensor().clone() for p in model.parameters()])

    return recorded, optimizer.register_step_pre_hook(record)


def worker(rank, world, meeting, folder, phase):
    distributed_run.join_group(rank, world, meeting)
    results = {}
    for case, name, reshard in CASES + ROUNDING_CASES:
        model = sharded(case, reshard)
        local_memory = [p.to_local().data_ptr() for p in model.parameters()]
        options = case_options(case, name)
        if phase == "resume" and "rounding_seed" in options:
            options = {**options, "rounding_seed": OTHER_SEED}
        optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
        checkpoint = os.path.join(folder, case)
        if phase == "train" and rounding(case):
            results[case + "-gradients"], hook = record_gradients(model, optimizer)
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
        if phase == "train" and rounding(case):
            hook.remove()
        results[case] = [p.full_tensor().detach().clone() for p in model.parameters()]
        if rounding(case):
            results[case + "-seed"] = optimizer.param_groups[0].get("rounding_seed")
            results[case + "-state"] = whole_state(model, optimizer)
            results[case + "-shifts"] = gathered_shifts(optimizer)
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
        for case, name, reshard in CASES + ROUNDING_CASES:
            if case in IN_BACKWARD or rounding(case):
                results[case + "-in-backward"] = in_backward(case, name, reshard, rank, world)
    if rank == 0:
        torch.save(results, os.path.join(folder, f"{phase}.pt"))
    distributed_run.leave(rank, meeting)


def in_backward(case, name, reshard, rank, world):
    """The case trained ``STEPS`` steps with ``step_in_backward=True`` and buckets of 32
    elements (one or two parameters each): its parameters, full, and whether the last
    backward stepped every bucket inside it (no gradient left)."""
    steps_in_backward.BUCKET_ELEMENTS = 32
    model = sharded(case, reshard)
    options = {**case_options(case, name), "step_in_backward": True}
    optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
    train(model, optimizer, rank, world, range(STEPS))  # its step() and zero_grad(): no-ops
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    return params, len(optimizer.buckets[0]), all(p.grad is None for p in model.parameters())


def whole_state(model, optimizer):
    """Each parameter's state tensors, whole (``full_tensor()``), but 8-bit absmax (its
    pieces are padded to the largest shard's blocks) and the step counts."""
    return [
        {
            key: value.full_tensor().clone()
            for key, value in sorted(optimizer.state[param].items())
            if key not in optimizer.scalar_state and not quantized.is_absmax(key)
        }
        for param in model.parameters()
    ]


def gathered_shifts(optimizer):
    """Every rank's `ParamBucket.rounding_shifts` of the optimizer's first bucket (what
    each shard adds to its parameter's random key), rank by rank."""
    shifts = torch.from_numpy(optimizer.buckets[0][0].rounding_shifts().copy())
    every = [torch.empty_like(shifts) for _ in range(dist.get_world_size())]
    dist.all_gather(every, shifts)
    return [s.tolist() for s in every]


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
