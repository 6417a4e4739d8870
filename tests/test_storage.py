"""The storage contract: whoever owns or changes a tensor's storage, no update is lost.

Each case does to our optimizer and to ``torch.optim``'s for-loop what user code and
the ecosystem do to storage (``share_memory``, ``.data`` and ``.grad.data`` assignment,
``set_``, ``Module._apply``, tying, views of one tensor) and compares the training.
"""

import copy
import io
import multiprocessing
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn

import fastmomentum
from fastmomentum import storage

from .assertions import RTOL, assert_relative_close, assert_same_training, join_within
from .cases import EVERY_RULE, torch_cases
from .models import backward, make_model, train, twins


def storages(model):
    return [
        (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()
    ]


@torch_cases(*EVERY_RULE)
def test_every_parameter_and_state_keeps_a_storage_of_its_own(name, options):
    model = make_model()
    values = [p.detach().clone() for p in model.parameters()]
    strides = [p.stride() for p in model.parameters()]
    optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
    for param, value, stride in zip(model.parameters(), values, strides):
        assert torch.equal(param, value) and param.stride() == stride
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
    assert len({pointer for pointer, _ in storages(model)}) == len(values)
    train(model, optimizer, 2)
    pieces = [v for entry in optimizer.state.values() for k, v in entry.items()]
    assert len({t.untyped_storage().data_ptr() for t in pieces if t.numel()}) == len(
        [t for t in pieces if t.numel()]
    )
    # The values still lie in one allocation: one launch covers them (see test_launches).
    first, *_, last = sorted(p.data_ptr() for p in model.parameters())
    assert last - first < sum(p.numel() for p in model.parameters()) * 8


@pytest.mark.parametrize("in_backward", [False, True])
def test_parameters_move_into_one_allocation_at_their_first_step_not_before(in_backward):
    """Adoption waits for the bucket's first step (freeing the old storages before the
    first iteration would raise glibc's mmap threshold, bench/NOTES.md entry 21)."""
    model = make_model()
    before = storages(model)
    optimizer = fastmomentum.AdamW(model.parameters(), lr=1e-2, step_in_backward=in_backward)
    optimizer.state_dict()  # makes the buckets
    assert storages(model) == before
    backward(model, seed=3)
    optimizer.step()
    assert all(pointer not in dict(before) for pointer, _ in storages(model))
    first, *_, last = sorted(p.data_ptr() for p in model.parameters())
    assert last - first < sum(p.numel() for p in model.parameters()) * 8


@pytest.mark.parametrize("in_backward", [False, True])
def test_the_heap_is_trimmed_once_after_the_first_step_has_freed_its_gradients(
    monkeypatch, in_backward
):
    calls = []
    monkeypatch.setattr(storage.FirstIteration, "RELEASE_FROM", 0)
    monkeypatch.setattr(storage, "release_free_heap", lambda: calls.append(1))
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), step_in_backward=in_backward)
    optimizer.zero_grad()
    assert calls == []  # nothing stepped yet
    for seed in range(3):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad()
    assert calls == [1]


def test_the_heap_of_a_small_model_is_left_alone():
    optimizer = fastmomentum.Adam(make_model().parameters())
    assert optimizer._first_iteration.done  # below FirstIteration.RELEASE_FROM (64 MiB)
    storage.release_free_heap()  # runs: glibc's malloc_trim(0), elsewhere nothing


@torch_cases(*EVERY_RULE)
def test_share_memory_after_a_step_keeps_training(name, options):
    """share_memory() moves every storage: the step follows (it used to write freed memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).double()
    ours, theirs, ref_model = twins(name, options, model)
    inputs, targets = torch.randn(16, 64, dtype=torch.float64), torch.randn(16, 4).double()
    for step in range(6):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(inputs), targets).backward()
            optimizer.step()
            if step == 1:
                net.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


def _hogwild_worker(model, steps):
    torch.set_num_threads(1)
    optimizer = fastmomentum.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, optimizer, steps)


def test_hogwild_worker_trains_the_shared_model():
    """A forked worker builds its optimizer on shared parameters and trains them in place."""
    model, ref_model = make_model(), make_model()
    model.share_memory()
    worker = multiprocessing.get_context("fork").Process(target=_hogwild_worker, args=(model, 5))
    worker.start()
    join_within(worker, 120, "the forked worker")  # 3-8 s at load 10 on 2 cores
    reference = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    train(ref_model, reference, 5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_relative_close(p.detach(), q.detach(), RTOL["float64"], "shared parameter")


@torch_cases(*EVERY_RULE)
def test_flat_gradients_follow_a_re_pointed_gradient(name, options):
    """``p.grad.data = …`` and ``model.double(); model.float()`` move the gradients."""
    model = make_model(torch.float32)
    ref_model = copy.deepcopy(model)
    ours = getattr(fastmomentum, name)(model.parameters(), flat_gradients=True, **options)
    theirs = getattr(torch.optim, name)(ref_model.parameters(), foreach=False, **options)
    for step in range(8):
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad(set_to_none=False)
            backward(net, step, torch.float32)
            if step == 3:
                net.head.weight.grad.data = net.head.weight.grad.data * 2.0
            if step == 5:
                net.double()
                net.float()
            optimizer.step()
    assert_same_training((model, ours), (ref_model, theirs), torch.float32)


@torch_cases(*EVERY_RULE)
def test_parameters_sharing_memory_across_groups_step_it_in_turn(name, options):
    """Two parameters on one memory in two groups (as torch steps them: one after the other)."""

    def groups(seed):
        torch.manual_seed(seed)
        base = torch.randn(6, 4, dtype=torch.float64)
        first = nn.Parameter(base)
        second = nn.Parameter(torch.empty(0, dtype=torch.float64))
        second.data = base  # the same memory, another parameter
        other = nn.Parameter(torch.randn(5, dtype=torch.float64))
        return base, [first, other], [second]

    results = []
    for library in (fastmomentum, torch.optim):
        base, first, second = groups(0)
        extra = {} if library is fastmomentum else {"foreach": False}
        optimizer = getattr(library, name)(
            [{"params": first}, {"params": second, "lr": 0.02}], **options, **extra
        )
        generator = torch.Generator().manual_seed(1)
        for _ in range(10):
            for param in first + second:
                param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            optimizer.step()
        results.append([base.clone(), *[p.detach().clone() for p in first + second]])
    for ours, theirs in zip(*results):
        assert_relative_close(ours, theirs, RTOL["float64"], "shared memory")
    assert not torch.equal(results[0][0], groups(0)[0])


@torch_cases(*EVERY_RULE)
def test_tied_after_construction_and_interleaved_views(name, options):
    """``p.data = q.data`` after construction, and the even and odd columns of one matrix
    (disjoint elements, overlapping address ranges) in one group."""
    torch.manual_seed(0)
    results = []
    for library in (fastmomentum, torch.optim):
        torch.manual_seed(0)
        matrix = torch.randn(5, 8, dtype=torch.float64)
        even, odd = nn.Parameter(matrix[:, ::2]), nn.Parameter(matrix[:, 1::2])
        tied, target = nn.Parameter(torch.randn(7).double()), nn.Parameter(torch.randn(7).double())
        params = [even, odd, tied, target]
        extra = {} if library is fastmomentum else {"foreach": False}
        optimizer = getattr(library, name)(params, **options, **extra)
        generator = torch.Generator().manual_seed(2)
        for step in range(10):
            if step == 4:
                tied.data = target.data  # tied after construction
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            optimizer.step()
        assert even.data_ptr() == matrix.data_ptr()  # stepped where they live
        results.append([matrix.clone(), *[p.detach().clone() for p in params]])
    for ours, theirs in zip(*results):
        assert_relative_close(ours, theirs, RTOL["float64"], "views and ties")


def test_a_failed_constructor_changes_nothing():
    """A later group is rejected: the earlier groups' parameters have not moved."""
    base = torch.randn(10)
    view = nn.Parameter(base[2:6])
    alone = nn.Parameter(torch.randn(3))
    before = [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in (view, alone)]
    eight_bit = nn.Parameter(torch.randn(3).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="float8"):
        fastmomentum.SGD([{"params": [view, alone]}, {"params": [eight_bit]}], lr=0.1)
    assert [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in (view, alone)] == before
    view.data.fill_(7.0)
    assert (base[2:6] == 7.0).all()  # still a view of base


@torch_cases(*EVERY_RULE)
def test_a_users_layout_change_is_kept(name, options):
    """``p.data = p.data.contiguous()`` on a channels_last weight and ``p.set_(…)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 4 * 4, 2))
    model = model.double().to(memory_format=torch.channels_last)
    ours, theirs, ref_model = twins(name, options, model)
    inputs = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    for step in range(8):
        if step == 3:
            for net in (model, ref_model):
                net[0].weight.data = net[0].weight.data.contiguous()
                bias = net[3].bias
                with torch.no_grad():
                    bias.set_(bias.detach().clone().untyped_storage(), 0, bias.shape)
        for net, optimizer in ((model, ours), (ref_model, theirs)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    assert model[0].weight.is_contiguous()
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


def test_flat_gradients_never_replace_a_users_gradient_in_a_step():
    weight = nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    optimizer = fastmomentum.SGD([weight], lr=0.1, momentum=0.9, flat_gradients=True)
    grad = torch.randn(4, 3, 2, 2)  # contiguous: not the parameter's layout
    weight.grad = grad
    for _ in range(3):
        optimizer.step()
        assert weight.grad is grad


def test_a_submodules_checkpoint_holds_its_own_bytes():
    model = make_model()
    fastmomentum.Adam(model.parameters())
    buffer = io.BytesIO()
    torch.save(model.head.state_dict(), buffer)
    head_bytes = sum(p.numel() * p.element_size() for p in model.head.parameters())
    assert len(buffer.getvalue()) < head_bytes + 2000  # the head's values and a header


def test_safetensors_round_trip_a_model_our_optimizer_steps(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = make_model()
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    safetensors.save_model(model, tmp_path / "model.safetensors")
    with safetensors.safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(model.state_dict())
    restored = make_model(seed=7)
    safetensors.load_model(restored, tmp_path / "model.safetensors")
    for p, q in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(p, q)
    safetensors.load_model(model, tmp_path / "model.safetensors")  # into our storages
    train(model, optimizer, 1)


def test_accelerate_save_and_load_state_keep_every_parameter(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    safetensors = pytest.importorskip("safetensors.torch")
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model(torch.float32)
    model, optimizer = accelerator.prepare(model, fastmomentum.Adam(model.parameters(), lr=1e-2))
    train(model, optimizer, 3, torch.float32)
    accelerator.save_state(tmp_path)
    with safetensors.safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(model.state_dict())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, 2, torch.float32)
    accelerator.load_state(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, expected_state["state"][index][key])


def test_a_gradient_re_pointed_to_another_dtype_is_refused_before_any_update():
    first, second = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    optimizer = fastmomentum.SGD([first, second], lr=0.1, momentum=0.9)
    first.grad, second.grad = torch.ones(4), torch.ones(3)
    second.grad.data = second.grad.data.double()
    before = [p.detach().clone() for p in (first, second)]
    with pytest.raises(
        ValueError, match="parameter 1 of param group 0 has a gradient of torch.float64"
    ):
        optimizer.step()
    assert all(torch.equal(p, was) for p, was in zip((first, second), before))
    assert len(optimizer.state) == 0


@pytest.mark.parametrize("library", [fastmomentum, torch.optim])
def test_a_parameter_whose_own_elements_overlap_is_refused_when_it_would_be_written(library):
    """An expanded tensor: stepped only without a gradient; with one, the step raises
    (torch's before or after stepping the others, ours before anything changes)."""
    expanded, other = nn.Parameter(torch.randn(1).expand(4)), nn.Parameter(torch.ones(3))
    extra = {"foreach": False} if library is torch.optim else {}
    optimizer = library.SGD([other, expanded], lr=0.5, **extra)
    other.grad = torch.ones(3)
    optimizer.step()  # the expanded parameter has no gradient: nothing to write
    assert torch.equal(other.detach(), torch.full((3,), 0.5))
    expanded.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="more than one element"):
        optimizer.step()
    if library is fastmomentum:
        assert torch.equal(other.detach(), torch.full((3,), 0.5))


def test_a_parameter_re_pointed_to_a_smaller_tensor_at_the_same_address_is_refused():
    """``p.data = p.data[:2]`` keeps the address: the step must not write 4 elements.
    Without a gradient it is not written at all, and the others step (as in torch). (A
    parameter without state would be stepped as it now is: test_fidelity.py.)"""
    param, other = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(3))
    optimizer = fastmomentum.SGD([param, other], lr=1.0, momentum=0.9)
    param.grad = torch.ones(4)
    optimizer.step()
    memory = param.data
    param.data = param.data[:2]
    param.grad, other.grad = None, torch.ones(3)
    optimizer.step()
    assert torch.equal(other.detach(), torch.zeros(3)) and not memory.any()
    param.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"changed from torch.float32 \(4,\)"):
        optimizer.step()
    assert not memory.any() and torch.equal(other.detach(), torch.zeros(3))


def test_a_parameter_over_memory_torch_did_not_allocate_is_stepped_there():
    """NumPy (or a multiprocessing array) owns the memory: its owner must see the step."""
    array = np.ones(4, np.float32)
    param = nn.Parameter(torch.from_numpy(array))
    optimizer = fastmomentum.SGD([param], lr=0.5)
    param.grad = torch.ones(4)
    optimizer.step()
    assert param.data_ptr() == array.ctypes.data
    np.testing.assert_array_equal(array, np.full(4, 0.5, np.float32))


def test_state_that_cannot_be_bound_raises_and_keeps_the_rest():
    """A user entry of the wrong shape: torch raises at the step; nothing else is lost."""
    first, second = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    optimizer = fastmomentum.SGD([first, second], lr=0.1, momentum=0.9)
    first.grad, second.grad = torch.ones(4), torch.ones(4)
    optimizer.step()
    kept = optimizer.state[second]["momentum_buffer"].clone()
    optimizer.state = defaultdict(
        dict, {first: {"momentum_buffer": torch.zeros(3)}, second: {"momentum_buffer": kept}}
    )
    before = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(RuntimeError, match="state 'momentum_buffer' of parameter 0"):
        optimizer.step()
    assert torch.equal(optimizer.state[second]["momentum_buffer"], kept)
    assert all(torch.equal(p, was) for p, was in zip((first, second), before))


def test_a_step_count_set_in_place_is_used():
    """``state[p]["step"].zero_()`` (with its moments): that parameter's bias correction
    restarts while the others' continue, as in torch."""
    model = make_model()
    ours, theirs, ref_model = twins("Adam", {"lr": 1e-2}, model)
    train(model, ours, 3)
    train(ref_model, theirs, 3)
    for optimizer, net in ((ours, model), (theirs, ref_model)):
        for value in optimizer.state[net.head.weight].values():
            value.zero_()
    train(model, ours, 3)
    train(ref_model, theirs, 3)
    assert_same_training((model, ours), (ref_model, theirs), torch.float64)


def test_flat_gradients_survive_a_deep_copy():
    param = nn.Parameter(torch.randn(3))
    optimizer = fastmomentum.SGD([param], lr=0.1, flat_gradients=True)
    assert copy.deepcopy(optimizer).buckets[0][0].gradients.flat
