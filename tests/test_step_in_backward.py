"""``step_in_backward=True``: each bucket steps inside backward, the numbers those of the
ordinary loop (``backward(); step(); zero_grad()``) bit for bit.

Buckets are made small (``BUCKET_ELEMENTS`` patched) so every model here has several, and
each backward after the first steps some of them while others still wait for their
gradients.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmomentum
from fastmomentum import backward as in_backward
from fastmomentum.kernels import config

from .cases import CASES, OPTIMIZERS, every_optimizer
from .models import batches, make_model

STEPS = 5


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    monkeypatch.setattr(in_backward, "BUCKET_ELEMENTS", 32)  # SmallNet: 4 to 9 buckets


def loss_of(model, tokens, targets):
    return nn.functional.mse_loss(model(tokens).float(), targets.float())


def train(model, optimizer, steps, stepping_backward, scheduler=None, accumulate=1, first=0):
    """``steps`` iterations of ``accumulate`` backward passes each; the ordinary loop, or
    backward alone (inside `no_step` but for the last), then the scheduler's step."""
    data = list(batches(steps * accumulate, torch.float32))
    for step in range(first, steps):
        for micro in range(accumulate):
            tokens, targets = data[step * accumulate + micro]
            last = micro == accumulate - 1
            if stepping_backward and not last:
                with optimizer.no_step():
                    loss_of(model, tokens, targets).backward()
            else:
                loss_of(model, tokens, targets).backward()
        if not stepping_backward:
            optimizer.step()
            optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same(model, ours, ref_model, theirs):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == reference["param_groups"]
    assert mine["state"].keys() == reference["state"].keys()
    for index, entry in reference["state"].items():
        assert mine["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(mine["state"][index][key], value), (index, key)


def twins(name, options, dtype=torch.float32):
    """(model, ours stepping in backward, a copy of the model, ours stepping after)."""
    model = make_model(dtype)
    ref_model = copy.deepcopy(model)
    cls = OPTIMIZERS[name].cls
    return (
        model,
        cls(model.parameters(), step_in_backward=True, **options),
        ref_model,
        cls(ref_model.parameters(), **options),
    )


def with_scheduler(optimizer):
    """A learning rate that changes every step, up to twice the case's."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=2 * optimizer.defaults["lr"],
        total_steps=STEPS + 1,
        cycle_momentum=False,
    )


@every_optimizer(dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_optimizer_steps_as_the_ordinary_loop(name, options, dtype):
    """Every optimizer and parameter dtype, with an LR schedule: bit-identical."""
    if dtype == torch.float16 and options.get("centered"):
        # float16 state: v − ḡ² turns negative where v underflows, its root NaN (torch too)
        options = {**options, "centered": False}
    model, ours, ref_model, theirs = twins(name, options, dtype)
    ours_schedule, their_schedule = with_scheduler(ours), with_scheduler(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, ours, STEPS, True, ours_schedule)
    train(ref_model, theirs, STEPS, False, their_schedule)
    assert len(ours.buckets[0]) > 3
    assert_same(model, ours, ref_model, theirs)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.isfinite().all() for p in model.parameters())  # a test that can fail


@every_optimizer(lambda info: info.supports_master_weights)
def test_master_weights(name, options):
    model, ours, ref_model, theirs = twins(
        name, {**options, "master_weights": True}, torch.bfloat16
    )
    train(model, ours, STEPS, True)
    train(ref_model, theirs, STEPS, False)
    assert_same(model, ours, ref_model, theirs)


@every_optimizer(lambda info: info.steps(torch.float32))
def test_bfloat16_state(name, options):
    model, ours, ref_model, theirs = twins(name, {**options, "state_dtype": torch.bfloat16})
    train(model, ours, STEPS, True)
    train(ref_model, theirs, STEPS, False)
    assert_same(model, ours, ref_model, theirs)


@every_optimizer(lambda info: info.supports_quantized_state)
def test_int8_state(name, options):
    options = {**options, "state_dtype": "int8_blockwise"}
    if options.get("centered"):
        options["centered"] = False  # refused with 8-bit state
    model, ours, ref_model, theirs = twins(name, options)
    train(model, ours, STEPS, True)
    train(ref_model, theirs, STEPS, False)
    assert_same(model, ours, ref_model, theirs)


LAYER_CASES = {
    "adamw": ("adamw", torch.float32, {}),
    "lamb": ("lamb", torch.float32, {}),
    "nesterov": ("nesterov", torch.float32, {}),
    "adamw-float64": ("adamw", torch.float64, {}),
    "lamb-float64": ("lamb", torch.float64, {}),
    "lamb-bfloat16": ("lamb", torch.bfloat16, {}),
    "lamb-int8-state": ("lamb", torch.float32, {"state_dtype": "int8_blockwise"}),
    "lamb-bfloat16-master": ("lamb", torch.bfloat16, {"master_weights": True}),
    "adamw-bfloat16-stochastic": (
        "adamw",
        torch.bfloat16,
        {"stochastic_rounding": True, "rounding_seed": 7},
    ),
}


@pytest.mark.parametrize("layer_case", list(LAYER_CASES))
def test_at_the_size_of_a_layer(layer_case, monkeypatch):
    """Parameters of 2^18 elements, 1 MiB buckets: the kernels split each bucket's work
    among threads by elements, so a parameter's chunks differ from the ordinary loop's
    bucket; LAMB's per-parameter norms are sums over those chunks, each summed from a
    chunk boundary of its tensor whatever the split and whichever loop runs it (a bias
    alone in its bucket runs the serial loop, the ordinary step's bucket the threaded
    one), and the chunks' sums added in chunk order (float64 parameters: adding them
    per thread's segment, then the segments', made 55,588 of the first layer's 262,144
    elements differ by the fourth step)."""
    monkeypatch.setattr(in_backward, "BUCKET_ELEMENTS", 2**18)
    case, dtype, extra = LAYER_CASES[layer_case]
    name, options = CASES[case]
    options = {**options, **extra}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Linear(512, 8))
    model = model.to(dtype)
    ref_model = copy.deepcopy(model)
    ours = OPTIMIZERS[name].cls(model.parameters(), step_in_backward=True, **options)
    theirs = OPTIMIZERS[name].cls(ref_model.parameters(), **options)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        inputs = torch.randn(64, 512, generator=generator).to(dtype)
        targets = torch.randn(64, 8, generator=generator).to(dtype)
        nn.functional.mse_loss(model(inputs), targets).backward()
        nn.functional.mse_loss(ref_model(inputs), targets).backward()
        theirs.step()
        theirs.zero_grad()
    assert len(ours.buckets[0]) >= 3
    assert_same(model, ours, ref_model, theirs)


@every_optimizer(cases={"SGD": ("sgd",)})
def test_no_step_accumulates_and_the_next_backward_steps_the_sum(name, options):
    model, ours, ref_model, theirs = twins(name, options)
    train(model, ours, 3, True, accumulate=3)
    train(ref_model, theirs, 3, False, accumulate=3)
    assert_same(model, ours, ref_model, theirs)


def test_buckets_step_inside_backward_and_free_their_gradients():
    """After the first backward, buckets step from the hooks: when the embedding's (the
    last) gradient arrives, the head has stepped and its gradient is gone; so is the
    embedding's own by the time a hook registered after ours runs."""
    model, ours, ref_model, theirs = twins("AdamW", {"lr": 1e-2})
    seen = []

    def when_embedding_arrives(param):
        head = model.head.weight
        seen.append((head.grad is None, torch.equal(head, before), param.grad is not None))

    model.embedding.weight.register_post_accumulate_grad_hook(when_embedding_arrives)
    arrivals = []
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(lambda p: arrivals.append(id(p)))
    ordinary_steps = []
    step = ours._step
    ours._step = lambda *a: ordinary_steps.append(1) or step(*a)
    for tokens, targets in batches(3, torch.float32):
        before = model.head.weight.detach().clone()
        loss_of(model, tokens, targets).backward()
    # the first backward learns the order and steps at its end, the ordinary way
    assert seen == [(False, True, True), (True, False, False), (True, False, False)]
    assert ordinary_steps == [1]
    buckets = ours.buckets[0]
    assert [id(p) for b in buckets for p in b.params] == arrivals[: len(buckets.group["params"])]
    assert all(sum(p.numel() * 4 for p in b.params) <= 256 for b in buckets if len(b.params) > 1)


def test_step_and_zero_grad_after_backward_change_nothing():
    """A loop written for torch.optim: ``step()`` after the stepping backward finds no
    gradient and does nothing (no second step, no hooks); ``step(closure)`` runs the
    closure, whose backward steps."""
    model, ours, ref_model, theirs = twins("Adam", {"lr": 1e-2})
    hooks = []
    ours.register_step_pre_hook(lambda *args: hooks.append("pre"))
    ours.register_step_post_hook(lambda *args: hooks.append("post"))
    data = list(batches(4, torch.float32))
    for tokens, targets in data[:2]:
        ours.zero_grad()
        loss_of(model, tokens, targets).backward()
        ours.step()
        ours.zero_grad(set_to_none=False)
    for tokens, targets in data[2:]:
        loss = ours.step(lambda t=tokens, y=targets: loss_of(model, t, y).backward() or 1.5)
        assert loss == 1.5
    train(ref_model, theirs, 4, False)
    assert_same(model, ours, ref_model, theirs)
    assert hooks == ["pre", "post"] * 4


def test_step_steps_gradients_accumulated_inside_no_step():
    model, ours, ref_model, theirs = twins("SGD", CASES["nesterov"][1])
    for tokens, targets in batches(3, torch.float32):
        with ours.no_step():
            loss_of(model, tokens, targets).backward()
        ours.step()
    train(ref_model, theirs, 3, False)
    assert_same(model, ours, ref_model, theirs)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """``torch.utils.checkpoint``: with ``use_reentrant=True`` the checkpointed layers'
    gradients arrive in a nested backward; each bucket still steps once, with every
    gradient it got."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    ref_layers = copy.deepcopy(layers)
    ours = fastmomentum.AdamW(layers.parameters(), lr=1e-2, step_in_backward=True)
    theirs = fastmomentum.AdamW(ref_layers.parameters(), lr=1e-2)

    def forward(net, inputs):
        hidden = net[0](inputs)
        hidden = checkpoint(net[1], hidden, use_reentrant=reentrant)
        hidden = checkpoint(net[2], torch.tanh(hidden), use_reentrant=reentrant)
        return net[3](hidden)

    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        inputs = torch.randn(4, 8, generator=generator, requires_grad=reentrant)
        forward(layers, inputs).pow(2).mean().backward()
        forward(ref_layers, inputs).pow(2).mean().backward()
        theirs.step()
        theirs.zero_grad()
    assert_same(layers, ours, ref_layers, theirs)
    assert all(p.grad is None for p in layers.parameters())


def test_parameters_without_a_gradient_are_skipped():
    """A parameter that takes no part in some backward passes: not moved, its state and
    step count untouched, as in torch; its bucket steps the others at the end."""
    model, ours, ref_model, theirs = twins("Adam", {"lr": 1e-2})
    for step, (tokens, targets) in enumerate(batches(5, torch.float32)):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            net.layer_norm.weight.requires_grad_(step % 2 == 0)
            net.conv.weight.requires_grad_(step != 1)
            loss_of(net, tokens, targets).backward()
            if optimizer is theirs:
                theirs.step()
                theirs.zero_grad()
    assert_same(model, ours, ref_model, theirs)


def test_gradients_accumulated_for_parameters_the_stepping_backward_does_not_reach():
    """A parameter used only in the backward inside `no_step`: the stepping backward
    never calls its hook, yet it steps with what it accumulated, as ``step()`` would."""
    model, ours, ref_model, theirs = twins("Adam", {"lr": 1e-2})
    generator = torch.Generator().manual_seed(4)
    for tokens, targets in batches(3, torch.float32):
        features = torch.randn(3, 16, generator=generator)
        with ours.no_step():
            loss_of(model, tokens, targets).backward()
        model.head(features).sum().backward()  # the head's gradients only
        loss_of(ref_model, tokens, targets).backward()
        ref_model.head(features).sum().backward()
        theirs.step()
        theirs.zero_grad()
    assert_same(model, ours, ref_model, theirs)
    assert all(p.grad is None for p in model.parameters())


def test_resume_from_a_state_dict_is_bit_identical():
    model, ours, ref_model, theirs = twins("AdamW", {"lr": 1e-2, "amsgrad": True})
    train(model, ours, 3, True)
    checkpoint = copy.deepcopy((model.state_dict(), ours.state_dict()))
    train(model, ours, 6, True, first=3)
    resumed_model = make_model(torch.float32, seed=5)
    resumed_model.load_state_dict(checkpoint[0])
    resumed = fastmomentum.AdamW(resumed_model.parameters(), step_in_backward=True)
    resumed.load_state_dict(checkpoint[1])
    train(resumed_model, resumed, 6, True, first=3)
    assert_same(model, ours, resumed_model, resumed)
    train(ref_model, theirs, 6, False)
    assert_same(model, ours, ref_model, theirs)


def test_torch_optim_resumes_our_checkpoint():
    model, ours, ref_model, _ = twins("Adam", {"lr": 1e-2})
    train(model, ours, 3, True)
    ref_model.load_state_dict(model.state_dict())
    theirs = torch.optim.Adam(ref_model.parameters(), lr=1e-2, foreach=False)
    theirs.load_state_dict(ours.state_dict())
    train(model, ours, 5, True, first=3)
    train(ref_model, theirs, 5, False, first=3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # torch's own arithmetic


def test_a_deleted_optimizer_no_longer_steps():
    model = make_model(torch.float32)
    ours = fastmomentum.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    del ours
    before = [p.detach().clone() for p in model.parameters()]
    for tokens, targets in batches(2, torch.float32):
        loss_of(model, tokens, targets).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())


def test_a_group_added_later_steps_in_backward():
    model, ours, ref_model, theirs = twins("SGD", CASES["sgd"][1])
    head = nn.Linear(4, 4)
    ref_head = copy.deepcopy(head)
    train(model, ours, 2, True)
    train(ref_model, theirs, 2, False)
    ours.add_param_group({"params": head.parameters(), "lr": 0.01})
    theirs.add_param_group({"params": ref_head.parameters(), "lr": 0.01})
    for tokens, _ in batches(3, torch.float32):
        head(model(tokens)).pow(2).mean().backward()
        ref_head(ref_model(tokens)).pow(2).mean().backward()
        theirs.step()
        theirs.zero_grad()
    assert torch.equal(head.weight, ref_head.weight)
    assert_same(model, ours, ref_model, theirs)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"flat_gradients": True}, ValueError, "flat_gradients=True keeps gradients"),
        ({"fused_zero_grad": True}, ValueError, "fused_zero_grad=True keeps gradients"),
        ({"step_in_backward": 1}, TypeError, "must be True or False"),
    ],
)
def test_options_that_cannot_go_together(options, error, match):
    model = make_model(torch.float32)
    with pytest.raises(error, match=match):
        fastmomentum.SGD(model.parameters(), **{"step_in_backward": True, **options})


def test_a_parameter_listed_twice_is_refused():
    model = make_model(torch.float32)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="listed more than once"):
        with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's warning
            fastmomentum.SGD(params + params[:1], lr=0.1, step_in_backward=True)


def test_global_norm_clipping_is_refused():
    model = make_model(torch.float32)
    ours = fastmomentum.AdamW(model.parameters(), step_in_backward=True)
    with pytest.raises(RuntimeError, match="norm over all gradients"):
        ours.clip_grad_norm_(1.0)


def test_a_grad_scaler_is_refused_before_the_next_step():
    """``GradScaler.step`` hands the optimizer ``found_inf``: refused there, and every
    later backward refuses before any bucket steps."""
    model = make_model(torch.float32)
    ours = fastmomentum.AdamW(model.parameters(), step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    data = list(batches(2, torch.float32))
    scaler.scale(loss_of(model, *data[0])).backward()
    with pytest.raises(RuntimeError, match="cannot be used with torch.amp.GradScaler"):
        scaler.step(ours)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="bfloat16 autocast"):
        scaler.scale(loss_of(model, *data[1])).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.cudasim
def test_cuda_kernels_in_backward(monkeypatch):
    """The CUDA kernels (in the simulator, on CPU tensors) step inside backward as the
    CPU kernels do after it."""
    pytest.importorskip("numba.cuda")
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    model, ours, ref_model, theirs = twins("AdamW", {"lr": 1e-2})
    monkeypatch.setattr(config, "FORCE_CUDA", False)
    train(ref_model, theirs, 3, False)
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    assert all(type(b.kernels).__name__ == "TorchStreamKernels" for b in ours.buckets[0])
    train(model, ours, 3, True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
