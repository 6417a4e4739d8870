"""torch.optim semantics beyond plain training: skipped params, zero_grad, groups, layouts."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import fastmomentum

from .assertions import RTOL, assert_relative_close, assert_same_training
from .cases import EVERY_RULE, torch_cases
from .models import backward, make_model, train, twins


@torch_cases(*EVERY_RULE)
def test_params_without_grad_are_skipped_with_their_step_counts(name, options):
    """A param whose .grad is None is not moved, its state untouched, its t not advanced."""
    model = make_model()
    ours, theirs, ref_model = twins(name, options, model)
    named = dict(model.named_parameters())
    for step in range(40):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            backward(net, step)
            for param_name, param in net.named_parameters():
                # head.bias misses every other step, layer_norm.weight its first ten
                if (param_name == "head.bias" and step % 2) or (
                    param_name == "layer_norm.weight" and step < 10
                ):
                    param.grad = None
            if optimizer is ours:
                skipped = {n: p.detach().clone() for n, p in named.items() if p.grad is None}
                state = {n: copy.deepcopy(dict(ours.state.get(named[n], {}))) for n in skipped}
            optimizer.step()
        for param_name, before in skipped.items():  # ours: not moved, state untouched
            assert torch.equal(named[param_name], before), (step, param_name)
            after = dict(ours.state.get(named[param_name], {}))
            assert after.keys() == state[param_name].keys()
            assert all(torch.equal(after[k], v) for k, v in state[param_name].items())
        if step < 10:  # no state until its first gradient (Adagrad: from construction)
            ref_weight = dict(ref_model.named_parameters())["layer_norm.weight"]
            assert (named["layer_norm.weight"] in ours.state) == (ref_weight in theirs.state)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)
    if "Adam" in name:
        steps = {n: float(ours.state[p]["step"]) for n, p in model.named_parameters()}
        assert steps["head.bias"] == 20 and steps["layer_norm.weight"] == 30
        assert steps["conv.weight"] == 40


@torch_cases(*EVERY_RULE)
def test_step_with_closure_returns_the_loss(name, options):
    model = make_model()
    ours, theirs, ref_model = twins(name, options, model)
    for step in range(10):

        def closure(net=model, optimizer=ours, seed=step):
            optimizer.zero_grad()
            return backward(net, seed)

        def ref_closure(net=ref_model, optimizer=theirs, seed=step):
            optimizer.zero_grad()
            return backward(net, seed)

        assert ours.step(closure).item() == pytest.approx(
            theirs.step(ref_closure).item(), rel=1e-12
        )
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_matches_torch(set_to_none):
    model = make_model()
    ours, theirs, ref_model = twins("SGD", {"lr": 0.1, "momentum": 0.9}, model)
    for net, optimizer in ((model, ours), (ref_model, theirs)):
        backward(net, 0)
        optimizer.step()
        grads = [param.grad for param in net.parameters()]
        optimizer.zero_grad(set_to_none=set_to_none)
        for param, grad in zip(net.parameters(), grads):
            if set_to_none:
                assert param.grad is None
            else:  # zeroed in place: the same tensor object, as torch leaves it
                assert param.grad is grad and not param.grad.any()
                assert not param.grad.requires_grad
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@pytest.mark.parametrize(
    "zeroing",
    ["optimizer-none", "optimizer-zero", "model-none", "model-zero", "assign", "accumulate"],
)
def test_every_way_of_resetting_grads_trains_like_torch(zeroing):
    """Grads that are our flat views, replaced, dropped or accumulated all step correctly."""
    model = make_model()
    ours, theirs, ref_model = twins("SGD", {"lr": 0.05, "momentum": 0.9}, model)
    for step in range(30):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            if zeroing == "optimizer-none":
                optimizer.zero_grad()
            elif zeroing == "optimizer-zero":
                optimizer.zero_grad(set_to_none=False)
            elif zeroing == "model-none":
                net.zero_grad()
            elif zeroing == "model-zero":
                net.zero_grad(set_to_none=False)
            elif zeroing == "assign":
                for param in net.parameters():
                    param.grad = torch.zeros_like(param)
            elif step % 3 == 0:  # accumulate over three backward passes
                optimizer.zero_grad()
            backward(net, step)
            if zeroing != "accumulate" or step % 3 == 2:
                optimizer.step()
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_add_param_group_mid_training(name, options):
    model = make_model()
    head = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    ref_model = copy.deepcopy(model)
    ref_head = list(ref_model.head.parameters())
    ref_body = [p for n, p in ref_model.named_parameters() if not n.startswith("head")]
    ours = getattr(fastmomentum, name)(body, **options)
    theirs = getattr(torch.optim, name)(ref_body, foreach=False, **options)
    for step in range(20):
        if step == 8:
            ours.add_param_group({"params": head, "lr": 0.02})
            theirs.add_param_group({"params": ref_head, "lr": 0.02})
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            net.zero_grad()
            backward(net, step)
            optimizer.step()
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_channels_last_layout_is_preserved(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    ).double()
    model = model.to(memory_format=torch.channels_last)
    ours, theirs, ref_model = twins(name, options, model)
    for param in model.parameters():
        if param.dim() == 4:
            assert param.is_contiguous(memory_format=torch.channels_last)
    inputs = torch.randn(4, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    for _ in range(15):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    for param in model.parameters():
        if param.dim() == 4:
            assert param.is_contiguous(memory_format=torch.channels_last)
            for value in ours.state[param].values():
                if value.dim() == 4:
                    assert value.is_contiguous(memory_format=torch.channels_last)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_frozen_zero_size_and_tied_params(name, options):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(16, 6)
            self.frozen = nn.Linear(6, 6)
            self.frozen.requires_grad_(False)
            self.empty = nn.Parameter(torch.zeros(0, 3))
            self.out = nn.Linear(6, 16, bias=False)
            self.out.weight = self.embedding.weight  # tied

        def forward(self, tokens):
            hidden = torch.tanh(self.frozen(self.embedding(tokens)))
            return self.out(hidden).mean() + self.empty.sum()

    torch.manual_seed(0)
    model = Tied().double()
    assert len(list(model.parameters())) == 4
    frozen_before = model.frozen.weight.detach().clone()
    ours, theirs, ref_model = twins(name, options, model)
    tokens = torch.randint(0, 16, (5, 7))
    for _ in range(12):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            net(tokens).backward()
            optimizer.step()
    assert torch.equal(model.frozen.weight, frozen_before)
    assert model.out.weight is model.embedding.weight
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


@torch_cases(*EVERY_RULE)
def test_params_of_several_dtypes_in_one_group(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[2].double()
    ours, theirs, ref_model = twins(name, options, model)
    inputs = torch.randn(9, 5)
    for _ in range(20):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            net[2](net[1](net[0](inputs)).double()).square().mean().backward()
            optimizer.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.float64}
    # float32 tolerance throughout: the float64 layer's gradients come through float32 ones
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_relative_close(p.detach(), q.detach(), RTOL["float32"], "param")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, value in theirs.state[q].items():
            assert ours.state[p][key].dtype == value.dtype
            if key != "step":
                assert_relative_close(ours.state[p][key], value, RTOL["float32"], key)


def test_reassigned_param_data_is_adopted():
    """User code that replaces ``p.data`` (with new values, even): the step follows it."""
    model = make_model()
    ours, theirs, ref_model = twins("Adam", {"lr": 1e-2}, model)
    train(model, ours, 5)
    train(ref_model, theirs, 5)
    with torch.no_grad():
        for param, ref_param in zip(model.parameters(), ref_model.parameters()):
            param.data = param.data * 0.5
            ref_param.data = ref_param.data * 0.5
    for step in range(5):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            backward(net, 100 + step)
            optimizer.step()
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


def test_step_hooks_and_profiler_range_work_as_in_torch():
    """Our step skips torch's hook wrapper only while nothing is hooked or profiling."""
    param = nn.Parameter(torch.randn(5))
    optimizer = fastmomentum.SGD([param], lr=0.1)
    calls = []
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    global_pre = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: calls.append("global pre")
    )
    global_post = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append("global post")
    )
    try:
        param.grad = torch.ones(5)
        optimizer.step()
        assert calls == ["global pre", "pre", "post", "global post"]
    finally:
        for handle in (pre, post, global_pre, global_post):
            handle.remove()
    calls.clear()
    before = param.detach().clone()
    optimizer.step()
    assert calls == [] and torch.allclose(param, before - 0.1)

    with torch.autograd.profiler.profile() as profile:
        optimizer.step()
    names = [event.name for event in profile.function_events]
    assert "Optimizer.step#SGD.step" in names


def test_a_pre_hook_may_replace_the_closure():
    param = nn.Parameter(torch.randn(3))
    optimizer = fastmomentum.SGD([param], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = param.square().sum()
        loss.backward()
        return loss

    handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: ((opt, closure), {}))
    loss = optimizer.step()
    handle.remove()
    assert loss is not None and param.grad is not None


@torch_cases(*EVERY_RULE)
def test_gradients_in_any_layout_step_like_torch(name, options):
    """Gradients read in place, copied (layout differs from the param's) or our views."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    bias = nn.Parameter(torch.randn(4))
    scale = nn.Parameter(torch.randn(5, 6))
    params = [weight, bias, scale]
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ours = getattr(fastmomentum, name)(params, **options)
    theirs = getattr(torch.optim, name)(ref_params, foreach=False, **options)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        grads[2] = grads[2].t().contiguous().t()  # transposed layout: must be copied in
        if step % 3 == 2:
            ours.zero_grad(set_to_none=False)  # our zeroed views; accumulate into them
            for p, g in zip(params, grads):
                p.grad.add_(g)
        else:
            for p, g in zip(params, grads):
                p.grad = g  # contiguous: differs from the channels_last weight's layout
        user_grads = [p.grad for p in params]
        kept = [g.clone() for g in user_grads]
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ours.step()
        theirs.step()
        for user_grad, before, p in zip(user_grads, kept, params):
            assert torch.equal(user_grad, before), "a step must not change a gradient"
            assert p.grad is user_grad and torch.equal(p.grad, before)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(params, ref_params):
        assert_relative_close(p.detach(), q.detach(), RTOL["float32"], "param")
        for key, value in theirs.state[q].items():
            if key != "step":
                assert_relative_close(ours.state[p][key], value, RTOL["float32"], key)


def test_hooks_run_once_for_a_subclass_that_overrides_step():
    class Logged(fastmomentum.SGD):
        def step(self, closure=None):
            return super().step(closure)

    param = nn.Parameter(torch.randn(3))
    optimizer = Logged([param], lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    param.grad = torch.ones(3)
    optimizer.step()
    assert calls == ["pre"]


def test_flat_gradient_buffer_is_allocated_only_when_used():
    model = make_model()
    optimizer = fastmomentum.SGD(model.parameters(), lr=0.05, momentum=0.9, flat_gradients=True)
    train(model, optimizer, 3)  # zero_grad(set_to_none=True): gradients read in place
    assert all(
        bucket.gradients.allocation is None for buckets in optimizer.buckets for bucket in buckets
    )
    train(model, optimizer, 2, set_to_none=False)
    assert all(
        bucket.gradients.allocation is not None
        for buckets in optimizer.buckets
        for bucket in buckets
    )
    for param in model.parameters():
        assert param.grad.data_ptr() != 0


@torch_cases(*EVERY_RULE)
def test_a_step_without_any_gradient_changes_nothing(name, options):
    model = make_model()
    optimizer, reference, _ = twins(name, options, model)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # before any backward: every .grad is None
    reference.step()
    assert all(torch.equal(p, was) for p, was in zip(model.parameters(), initial))
    assert len(optimizer.state) == len(reference.state)  # none; Adagrad's from the start
    train(model, optimizer, 2)
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    for p, was in zip(model.parameters(), before):
        assert torch.equal(p, was)
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state["state"][index][key]), key
