"""The CUDA kernels, in Numba's CUDA simulator on small odd-sized arrays.

Threads per block and blocks per multiprocessor are patched small, so the simulator runs
several blocks and every thread's grid-stride loop takes several turns.
"""

import inspect

import numpy as np
import pytest
import torch

from fastmomentum import kernels
from fastmomentum.kernels import adam_step, config, sgd_step
from fastmomentum.kernels.calls import cuda_kernels

from . import reference
from .assertions import RTOL, assert_relative_close
from .cases import (
    ADAM_CASES,
    OPTIMIZERS,
    SGD_CASES,
    adam_options,
    every_kernel,
    every_optimizer,
    learning_rate,
    sgd_options,
)
from .models import make_model, train

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
pytestmark = pytest.mark.cudasim

SIZES = [1, 37, 203]  # not multiples of the block; 203 > blocks × threads below
STEPS = 6


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)  # 32 threads on any device


def on_device(*arrays):
    return [cuda.to_device(array) for array in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("convention", ["pytorch", "lr_folded"])
@pytest.mark.parametrize("case", SGD_CASES)
def test_cuda_sgd_matches_cpu_kernel_and_float64_reference(case, convention, size, dtype):
    rng = np.random.default_rng(size)
    host = [rng.standard_normal(size).astype(dtype), np.zeros(size, dtype)]
    device = on_device(*host)
    expected = [a.astype(np.float64) for a in host]
    options = sgd_options(case)
    for step in range(STEPS):
        grad = rng.standard_normal(size).astype(dtype)
        common = dict(lr=learning_rate(step), first_step=step == 0, **options)
        sgd_step(
            device[0], cuda.to_device(grad), device[1], momentum_convention=convention, **common
        )
        sgd_step(host[0], grad, host[1], momentum_convention=convention, **common)
        expected = reference.sgd(
            expected[0],
            grad.astype(np.float64),
            expected[1],
            lr_folded=convention == "lr_folded",
            **common,
        )
    tolerance = RTOL[np.dtype(dtype).name]
    for name, gpu, cpu_value, wanted in zip(["param", "momentum_buffer"], device, host, expected):
        if name == "momentum_buffer" and not case["momentum"]:
            continue
        assert_relative_close(gpu.copy_to_host(), cpu_value, tolerance, f"{name} vs CPU")
        assert_relative_close(gpu.copy_to_host(), wanted, tolerance, f"{name} vs float64")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", ADAM_CASES)
def test_cuda_adam_matches_cpu_kernel_and_float64_reference(case, size, dtype):
    rng = np.random.default_rng(size + 3)
    host = [rng.standard_normal(size).astype(dtype)] + [np.zeros(size, dtype) for _ in range(3)]
    device = on_device(*host)
    expected = [a.astype(np.float64) for a in host]
    options, decoupled = adam_options(case)
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        lr = learning_rate(step) / 10
        for arrays, g in ((device, cuda.to_device(grad)), (host, grad)):
            adam_step(
                arrays[0],
                g,
                *arrays[1:],
                step=step,
                lr=lr,
                decoupled_weight_decay=decoupled,
                **options,
            )
        expected = reference.adam(
            expected[0],
            grad.astype(np.float64),
            *expected[1:],
            step=step,
            lr=lr,
            decoupled=decoupled,
            **options,
        )
    tolerance = RTOL[np.dtype(dtype).name]
    names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for name, gpu, cpu_value, wanted in zip(names, device, host, expected):
        if name == "max_exp_avg_sq" and not options["amsgrad"]:
            assert not gpu.copy_to_host().any()
            continue
        assert_relative_close(gpu.copy_to_host(), cpu_value, tolerance, f"{name} vs CPU")
        assert_relative_close(gpu.copy_to_host(), wanted, tolerance, f"{name} vs float64")


def test_mixed_host_and_device_arrays_are_rejected():
    param, grad = np.ones(5, np.float32), np.ones(5, np.float32)
    with pytest.raises(TypeError, match="param on the GPU but grad in host memory"):
        sgd_step(cuda.to_device(param), grad, lr=0.1)


def test_device_arrays_are_checked_before_any_write():
    storage = cuda.to_device(np.arange(12, dtype=np.float32))
    grad = cuda.to_device(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="overlap"):
        sgd_step(storage[:8], grad, storage[4:], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="dtype float64"):
        sgd_step(storage[:8], cuda.to_device(np.ones(8)), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        sgd_step(storage[:8], cuda.to_device(np.ones(7, np.float32)), lr=0.1)
    np.testing.assert_array_equal(storage.copy_to_host(), np.arange(12, dtype=np.float32))


def test_a_stream_is_accepted_for_device_arrays_only():
    param, grad = np.ones(9, np.float32), np.full(9, 0.5, np.float32)
    device_param = cuda.to_device(param)
    stream = cuda.stream()
    sgd_step(device_param, cuda.to_device(grad), lr=0.1, stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(device_param.copy_to_host(), 0.95)
    with pytest.raises(ValueError, match="stream applies to CUDA arrays"):
        sgd_step(param, grad, lr=0.1, stream=stream)


@every_optimizer(
    cases={"SGD": ("sgd-dampened", "nesterov-maximize"), "Adam": ("adam-amsgrad-decay",)},
    dtypes=[torch.float32, torch.float64],
)
def test_optimizers_through_the_cuda_kernels_match_torch(name, options, dtype, monkeypatch):
    """``config.FORCE_CUDA``: the torch optimizers launch the CUDA kernels on CPU tensors.
    Compared with torch's for-loop within `RTOL`; where torch has no peer (LAMB), with
    ours on the CPU kernels within 16 ulps of the dtype (LAMB measured ≤ 3.1 after 8
    steps through the model's feedback: its norms are summed in another order)."""
    info = OPTIMIZERS[name]
    model, ref_model = make_model(dtype), make_model(dtype)
    if info.peer is None:
        theirs = info.cls(ref_model.parameters(), **options)
    else:
        theirs = info.peer(ref_model.parameters(), foreach=False, **options)
    for set_to_none in (True, False):  # gradients read in place, then our flat views
        train(ref_model, theirs, 4, dtype, set_to_none=set_to_none)
    if info.peer is None:
        assert all(
            type(b.kernels).__name__ != "TorchStreamKernels" for bs in theirs.buckets for b in bs
        )
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    ours = info.cls(model.parameters(), **options)
    assert all(type(b.kernels).__name__ == "TorchStreamKernels" for bs in ours.buckets for b in bs)
    for set_to_none in (True, False):
        train(model, ours, 4, dtype, set_to_none=set_to_none)
    tolerance = RTOL[str(dtype)[6:]] if info.peer else 16 * torch.finfo(dtype).eps
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_relative_close(p.detach(), q.detach(), tolerance, "param")
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, value in theirs.state[q].items():
            if key == "step":
                assert float(ours.state[p][key]) == float(value)
            else:
                assert_relative_close(ours.state[p][key], value, tolerance, key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@every_kernel()
def test_every_low_level_step_on_the_gpu_is_its_cpu_step(kernel, options, size, dtype):
    """Each optimizer's ``kernels.*_step`` on device arrays against the same call on host
    arrays (which the kernel tests hold to a float64 reference): every state array, and
    what it returns (NAdam's ``mu_product``, LAMB's trust ratio).

    Within 4 ulps of the dtype (relative to the array's largest value): both targets run
    the same rule on each element. Measured in the simulator after 6 steps: bit for bit
    for every family but LAMB (≤ 1.3 ulps: its norms are summed per GPU segment, per CPU
    chunk) at the time of writing; 1 ulp on a few elements of Adam's at 9b71011.
    """
    _low_level_steps_match(kernel, options, size, dtype)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd offset"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@every_kernel()
def test_whole_tiles_of_every_element_size_step_as_the_cpu(
    kernel, options, dtype, offset, monkeypatch
):
    """Segments of 512 elements, so that each element size's group loop runs on whole
    groups (16 bytes of each array: 8 float16, 4 float32 or 2 float64 elements,
    `kernels.cuda._element_loop`) and the rest of a segment one element at a time: 1100
    elements are 2 segments and 76 elements more. Aligned device arrays (as allocated)
    take the vector loads; arrays one element into their allocation, today's whole
    tiles of a warp's 32 groups (tests/test_vectors.py checks which path runs)."""
    monkeypatch.setattr(config, "ITEMS_PER_THREAD", 64)
    _low_level_steps_match(kernel, options, 1100, dtype, offset)


def _at_offset(array, offset):
    """``array`` on the device, ``offset`` elements into an allocation of its own."""
    if not offset:
        return cuda.to_device(array)
    return cuda.to_device(np.concatenate([np.ones(offset, array.dtype), array]))[offset:]


def _low_level_steps_match(kernel, options, size, dtype, offset=0):
    """Steps of ``kernel`` on device arrays (``offset`` elements into their allocations)
    give what they give on host arrays."""
    step_function = getattr(kernels, kernel)
    parameters = inspect.signature(step_function).parameters
    arrays = [n for n, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    rng = np.random.default_rng(size + 17)
    host = [rng.standard_normal(size).astype(dtype)]
    host += [np.zeros(size, dtype) for _ in arrays[2:]]  # state starts at zero
    device = [_at_offset(array, offset) for array in host]
    carried = {"gpu": {}, "cpu": {}}  # NAdam's mu_product, passed on to the next call
    tolerance = 4 * np.finfo(dtype).eps
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(size).astype(dtype)
        counts = {"step": step, "first_step": step == 1}
        counts = {key: value for key, value in counts.items() if key in parameters}
        returned = {}
        on_gpu = ("gpu", device, _at_offset(grad, offset))
        for where, state, g in (on_gpu, ("cpu", host, grad)):
            returned[where] = step_function(
                state[0], g, *state[1:], **options, **counts, **carried[where]
            )
            if "mu_product" in parameters:
                carried[where]["mu_product"] = returned[where]
        if returned["cpu"] is not None:
            assert_relative_close(returned["gpu"], returned["cpu"], tolerance, f"returned {step}")
    for name, gpu, cpu_value in zip([arrays[0], *arrays[2:]], device, host):
        assert_relative_close(gpu.copy_to_host(), cpu_value, tolerance, f"{name} vs CPU")


def test_amsgrad_keeps_nan_like_torch_maximum():
    host = [np.ones(3, np.float32), np.array([1.0, np.nan, 1.0], np.float32)]
    state = [np.zeros(3, np.float32) for _ in range(3)]
    device = on_device(host[0], *state)
    adam_step(device[0], cuda.to_device(host[1]), *device[1:], step=1, amsgrad=True)
    adam_step(host[0], host[1], *state, step=1, amsgrad=True)
    for gpu, cpu_value in zip(device, [host[0], *state]):
        np.testing.assert_array_equal(np.isnan(gpu.copy_to_host()), np.isnan(cpu_value))
    assert np.isnan(state[2][1]) and not np.isnan(state[2][0])


def test_a_kernel_per_value_of_its_flags():
    from fastmomentum.kernels import cuda as kernels_cuda
    from fastmomentum.kernels import rules

    spec = rules.rmsprop.SPEC  # has_momentum, centered
    assert kernels_cuda.kernel(spec) is kernels_cuda.kernel(spec, (False, False))
    chosen = {kernels_cuda.kernel(spec, flags) for flags in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    assert len(chosen) == 4
    source = kernels_cuda.kernel_source(spec, (True, False))
    definition, body = source.split("\n", 1)
    assert "has_momentum" not in definition and "centered" not in definition
    assert body.startswith("    has_momentum = True\n    centered = False\n")
    with pytest.raises(ValueError, match="takes 2 flags"):
        kernels_cuda.kernel(spec, (True,))


@pytest.mark.parametrize(
    ("natural", "limited", "chosen"),
    [
        ((83, 0), (80, 0), "limited"),  # over the limit: compiled again within it
        ((83, 0), (80, 16), "as written"),  # within it only by spilling: kept
        ((76, 0), None, "as written"),  # under it: never compiled with a limit
    ],
)
def test_a_launch_limits_registers_only_where_they_exceed_the_limit(
    monkeypatch, natural, limited, chosen
):
    """`kernels.cuda.fitted` (on a GPU, registers and local memory come from the loaded
    kernel; here, from a stand-in): capturable RAdam over float32 params and bfloat16
    state may take 80 registers, which let 3 blocks of 256 be resident per SM."""
    from fastmomentum.kernels import cuda as kernels_cuda
    from fastmomentum.kernels import rules
    from fastmomentum.kernels.capturable import capturable
    from fastmomentum.kernels.tables import TensorTable

    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 256)
    monkeypatch.setattr(kernels_cuda, "_fitted", {})
    spec, flags = capturable(rules.radam.SPEC), ()
    written, within = kernels_cuda.kernel(spec, flags), kernels_cuda.kernel(spec, flags, 80)
    compiled = []

    def resources(dispatcher, arguments):
        compiled.append(dispatcher)
        return natural if dispatcher is written else limited

    monkeypatch.setattr(kernels_cuda, "_resources", resources)
    formats = (np.float32, np.float32, np.uint16, np.float32)
    table = TensorTable([5], 6, np.float32, formats=formats)
    arguments = (0,) * 12
    found = kernels_cuda.fitted(spec, flags, table, arguments)
    assert found is (within if chosen == "limited" else written)
    assert compiled == ([written] if limited is None else [written, within])
    assert kernels_cuda.fitted(spec, flags, table, arguments) is found  # decided once
    given = 80 if chosen == "limited" else None
    assert kernels_cuda.launched() == [(spec, flags, formats, given, found)]
    assert len(compiled) == (1 if limited is None else 2)
    assert {written, within} <= set(kernels_cuda.kernels_of(spec))


def test_a_limited_kernel_is_compiled_from_a_file_of_its_own():
    """Numba's disk cache keys a kernel on its source file: the limit is in the file."""
    from fastmomentum.kernels import cuda as kernels_cuda
    from fastmomentum.kernels import rules

    written, limited = (kernels_cuda.kernel(rules.adam.SPEC, (False,), n) for n in (None, 80))
    files = [inspect.getsourcefile(k.py_func) for k in (written, limited)]
    assert files[0] != files[1]
    with open(files[1]) as generated:
        assert generated.readline().startswith("# at most 80 registers a thread")


#: Per bucket, what one steady-state step of each optimizer does on the host through
#: the CUDA kernels (`kernels.cuda.COUNTS`): (launches, uploads, waits). Two launches
#: for the two-pass steps (LAMB: direction and norms, then the update; Muon: momentum,
#: then the orthogonalised update). Bias corrections, which change every step, are kernel
#: arguments while a bucket's parameters share a step count (`kernels.cuda._uniform_values`),
#: and LAMB's norms stay on the GPU (`kernels.sums`): nothing is copied. Muon's uploads
#: are at most both passes' addresses: its scratch array of ``U`` is allocated anew each
#: step, at the same address or not as the allocator has it (here malloc's).
STEADY = {
    "SGD": (1, 0, 0),
    "Adam": (1, 0, 0),
    "AdamW": (1, 0, 0),
    "NAdam": (1, 0, 0),
    "RAdam": (1, 0, 0),
    "Adamax": (1, 0, 0),
    "RMSprop": (1, 0, 0),
    "Adagrad": (1, 0, 0),
    "LAMB": (2, 0, 0),
    "Lion": (1, 0, 0),
    "Muon": (2, 2, 0),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_steady_step_launches_once_per_pass_and_never_waits(name, monkeypatch):
    """Launches, uploads and host waits of a step after the first (layout unchanged),
    per bucket, for every optimizer's first case on a model of matrices (Muon's too)."""
    monkeypatch.setattr(config, "FORCE_CUDA", True)
    info = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 3, bias=False)
    ).double()
    optimizer = info.cls(model.parameters(), **info.cases[info.rules[0]])
    counts = cuda_kernels().COUNTS
    for _ in range(3):
        model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
        counts.reset()
        optimizer.step()
    buckets = sum(len(group_buckets) for group_buckets in optimizer.buckets)
    launches, uploads, waits = STEADY[name]
    if name == "Muon":  # at most (see STEADY)
        uploads = min(uploads, counts.uploads // buckets)
    assert counts.as_dict() == {
        "launches": launches * buckets,
        "uploads": uploads * buckets,
        "waits": waits * buckets,
    }
    with torch.no_grad():  # a new layout: the tables are uploaded whole again
        for param in model.parameters():
            param.data = param.data.clone()
    model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
    counts.reset()
    optimizer.step()
    assert counts.uploads >= 3 * launches * buckets


def test_entry_values_passed_as_arguments_or_copied_step_as_the_cpu():
    """A table of two Adam entries launched 6 times: their bias corrections the same at
    steps 1-2 and 5-6 (passed as kernel arguments, nothing copied: the GPU's copy left
    behind), different at steps 3-4 (copied, read per entry). Each launch is the CPU
    launch's, bit for bit, and copies only at the steps where the values part ways."""
    from fastmomentum.kernels import cpu
    from fastmomentum.kernels.arrays import address_of
    from fastmomentum.kernels.rules import adam
    from fastmomentum.kernels.tables import TensorTable

    kernels, sizes, rng = cuda_kernels(), (37, 50), np.random.default_rng(5)
    arrays = [[rng.standard_normal(n).astype(np.float32) for _ in range(4)] for n in sizes]
    for entry in arrays:
        entry[3] = np.abs(entry[3])  # a second moment
    places = {"cpu": [[a.copy() for a in entry] for entry in arrays]}
    places["gpu"] = [on_device(*entry) for entry in arrays]
    shared = adam.coefficients(np.float32, 0.01, (0.9, 0.999), 1e-8, 0.1, False, False)
    tables = {}
    for where, entries in places.items():
        tables[where] = TensorTable(sizes, 5, np.float32, adam.SPEC.entry_width)
        tables[where].addresses[:, :4] = [[address_of(a) for a in entry] for entry in entries]
    counts = [(1, 1), (2, 2), (3, 7), (4, 8), (9, 9), (10, 10)]
    uploads = []
    for steps in counts:
        rows = adam.step_coefficients_per_entry(np.float32, np.array(steps), 0.01, (0.9, 0.999))
        for where, module in (("cpu", cpu), ("gpu", kernels)):
            tables[where].entry_values[:] = rows
            kernels.COUNTS.reset()
            module.launch(tables[where], adam.SPEC, shared, (False,))
        uploads.append(kernels.COUNTS.uploads)
        for cpu_entry, gpu_entry in zip(places["cpu"], places["gpu"]):
            for cpu_array, gpu_array in zip(cpu_entry, gpu_entry):
                np.testing.assert_array_equal(gpu_array.copy_to_host(), cpu_array)
    assert uploads == [3, 0, 1, 1, 0, 0]  # the first launch copies the whole table


def test_tables_kept_on_the_gpu_are_kept_per_stream():
    """A table launched on one stream is copied whole again for another: a copy into the
    first stream's device arrays would not wait for that stream's launches to read them.
    Launched again on a stream it used, nothing is copied."""
    from fastmomentum.kernels import rules
    from fastmomentum.kernels.calls import one_entry

    kernels = cuda_kernels()
    param, grad = on_device(np.ones(8, np.float32), np.full(8, 0.5, np.float32))
    table = one_entry([param, grad])
    coefficients = tuple(rules.sgd.plain_coefficients(np.float32, 0.1, 0.0, False))
    first, second = cuda.stream(), cuda.stream()
    for stream, uploads in ((first, 3), (first, 0), (second, 3), (first, 0), (second, 0)):
        kernels.COUNTS.reset()
        kernels.launch(table, rules.sgd.PLAIN, coefficients, stream=stream)
        assert kernels.COUNTS.uploads == uploads
    np.testing.assert_allclose(param.copy_to_host(), 1 - 5 * 0.1 * 0.5, rtol=1e-6)
