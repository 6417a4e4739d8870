"""LAMB against a float64 NumPy reference (torch has none), its per-tensor norms, the
0-norm cases, checkpoints and the CUDA simulator."""

import copy

import numba
import numpy as np
import pytest
import torch
from torch import nn

import fastmomentum
from fastmomentum.kernels import config, cpu, lamb_step, rules
from fastmomentum.kernels.tables import TensorTable

from . import reference
from .assertions import RTOL, assert_relative_close

SHAPES = [(20, 30), (30,), (5, 3, 4), (7,)]
OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.01},
    {"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-8, "maximize": True},
    {"lr": 1e-2, "weight_decay": 0.1, "bias_correction": False},
]


def _params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    params[-1].zero_()  # a zero tensor: its trust ratio is 1
    return [p.requires_grad_() for p in params]


def _run_reference(values, grads_per_step, options):
    settings = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}
    settings |= {"bias_correction": True, "maximize": False, **options}
    lr = settings.pop("lr")
    state = [(v.astype(np.float64), np.zeros(v.shape), np.zeros(v.shape)) for v in values]
    for step, grads in enumerate(grads_per_step, start=1):
        state = [
            reference.lamb(p, g, m, v, step=step, lr=lr, **settings)[:3]
            for (p, m, v), g in zip(state, grads)
        ]
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=["decay", "betas-maximize", "no-correction"])
def test_lamb_steps_each_tensor_by_its_own_trust_ratio(options, dtype):
    params = _params(dtype)
    values = [p.detach().numpy().copy() for p in params]
    optimizer = fastmomentum.LAMB(params, **options)
    generator = torch.Generator().manual_seed(1)
    grads_per_step = []
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=generator, dtype=dtype) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        grads_per_step.append([g.numpy() for g in grads])
    expected = _run_reference(values, grads_per_step, options)
    tolerance = RTOL[str(dtype).removeprefix("torch.")]
    for param, (want, m, v) in zip(params, expected):
        assert_relative_close(param.detach().numpy(), want, tolerance, "param")
        assert_relative_close(optimizer.state[param]["exp_avg"].numpy(), m, tolerance, "exp_avg")
        assert_relative_close(optimizer.state[param]["exp_avg_sq"].numpy(), v, tolerance, "v")
        assert float(optimizer.state[param]["step"]) == 10
    assert not torch.equal(params[-1], torch.zeros(7, dtype=dtype))  # moved by lr·u


def test_a_zero_update_leaves_the_tensor_where_it_is():
    """‖u‖ = 0 (zero gradient, no weight decay): r is 1 and nothing moves."""
    param = torch.randn(10, dtype=torch.float64, requires_grad=True)
    before = param.detach().clone()
    optimizer = fastmomentum.LAMB([param])
    param.grad = torch.zeros(10, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize("threading", ["serial", "threaded"])
def test_the_direction_pass_sums_each_tensors_squares(threading, monkeypatch):
    """The per-tensor norms are a segmented reduction in the direction pass: per segment
    in the loop, per entry on the host."""
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 1 << 62 if threading == "serial" else 0)
    rng = np.random.default_rng(2)
    lengths = [1000, 0, 5, 70000, 3]
    arrays = [
        [rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n), rng.random(n)]
        for n in lengths
    ]
    wanted = []
    for param, grad, m, v in arrays:  # the moments and u after the step, then the sums
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
        update = m / (np.sqrt(v) + 1e-6) + 0.01 * param
        wanted.append([np.sum(param**2), np.sum(update**2)])
    table = TensorTable(lengths, 4, np.float64, 2)
    for row, columns in enumerate(arrays):
        table.addresses[row] = [array.ctypes.data for array in columns]
    table.entry_values[:] = 1.0  # no bias correction
    coefficients = rules.lamb.coefficients(np.dtype(np.float64), (0.9, 0.999), 1e-6, 0.01, False)
    sums = cpu.launch(table, rules.lamb.DIRECTION, coefficients, (False, False))
    np.testing.assert_allclose(sums, wanted, rtol=1e-12)
    assert sums[0, 1] > 0


def test_the_low_level_step_is_the_reference_and_returns_the_ratio():
    rng = np.random.default_rng(3)
    param = rng.standard_normal(500)
    m, v = np.zeros(500), np.zeros(500)
    want, want_m, want_v = param.copy(), np.zeros(500), np.zeros(500)
    for step in range(1, 6):
        grad = rng.standard_normal(500)
        ratio = lamb_step(param, grad, m, v, step=step, lr=1e-2, weight_decay=0.01)
        want, want_m, want_v, want_ratio = reference.lamb(
            want, grad, want_m, want_v, step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
            weight_decay=0.01, bias_correction=True, maximize=False,
        )  # fmt: skip
        assert ratio == pytest.approx(want_ratio, rel=1e-12)
    assert_relative_close(param, want, RTOL["float64"], "param")


def test_a_lamb_run_resumes_bit_identically():
    params = _params(torch.float32)
    optimizer = fastmomentum.LAMB(params, lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(4)

    def run(optim, group, steps):
        for _ in range(steps):
            for param in group:
                param.grad = torch.randn(param.shape, generator=generator)
            optim.step()

    run(optimizer, params, 3)
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = fastmomentum.LAMB(twins, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    state = generator.get_state()
    run(optimizer, params, 2)
    generator.set_state(state)
    run(resumed, twins, 2)
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def _aliased_params():
    """One memory as two parameters (the second after another), the even and odd
    columns of one matrix (disjoint elements, staged: strided), and one of its own."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    matrix = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    first, second = nn.Parameter(base), nn.Parameter(torch.empty(0, dtype=torch.float64))
    second.data = base  # the same memory, another parameter
    even, odd = nn.Parameter(matrix[:, ::2]), nn.Parameter(matrix[:, 1::2])
    other = nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
    return [first, even, other, odd, second]


@pytest.mark.parametrize("fused_zero_grad", [False, True])
def test_parameters_sharing_memory_take_whole_steps_in_turn(fused_zero_grad):
    """Each parameter's two passes run before the next parameter that shares its memory
    is stepped, as a loop over parameters would step them (the reference below)."""
    options = {"lr": 1e-2, "weight_decay": 0.01}
    params, wanted = _aliased_params(), _aliased_params()
    optimizer = fastmomentum.LAMB(params, fused_zero_grad=fused_zero_grad, **options)
    moments = [(np.zeros(p.shape), np.zeros(p.shape)) for p in wanted]
    generator = torch.Generator().manual_seed(8)
    for step in range(1, 11):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        for index, (param, grad) in enumerate(zip(wanted, grads)):
            view = param.detach().numpy()  # the memory itself, shared as the params share it
            new, m, v, _ = reference.lamb(
                view.copy(), grad.numpy(), *moments[index], step=step, betas=(0.9, 0.999),
                eps=1e-6, bias_correction=True, maximize=False, **options,
            )  # fmt: skip
            view[...], moments[index] = new, (m, v)
        if fused_zero_grad:
            assert all(not p.grad.any() for p in params)
    assert params[0].data_ptr() == params[-1].data_ptr()
    for ours, theirs in zip(params, wanted):
        assert_relative_close(ours.detach().numpy(), theirs.detach().numpy(), RTOL["float64"], "p")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: fastmomentum.LAMB(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: fastmomentum.LAMB(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (lambda p: fastmomentum.LAMB(p, weight_decay=-0.1), "Invalid weight_decay value"),
        (lambda p: fastmomentum.LAMB(p, state_dtype=torch.float16), "state_dtype must be None"),
        (lambda p: fastmomentum.LAMB(p, kahan_sum=True), "kahan_sum=True is for bfloat16"),
        (lambda p: fastmomentum.LAMB([p[0].detach().to(torch.float16).requires_grad_()],
                                     state_dtype=torch.bfloat16), "is for float32 parameters"),
    ],
    ids=["lr", "beta", "weight-decay", "float16-state", "kahan-float32", "bf16-state-float16"],
)  # fmt: skip
def test_what_lamb_refuses(make, message):
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=message):
        make(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.cudasim
def test_lamb_through_the_cuda_kernels_is_the_cpu_step(monkeypatch):
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        params = [p.detach()[:3].clone().requires_grad_() for p in _params(torch.float32)[:2]]
        optimizer = fastmomentum.LAMB(params, lr=1e-2, weight_decay=0.01)
        generator = torch.Generator().manual_seed(6)
        for _ in range(2):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        results.append(params)
    for cpu_param, cuda_param in zip(*results):
        torch.testing.assert_close(cuda_param, cpu_param, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cpu_and_the_gpu_make_the_same_step_size_of_the_same_norms(dtype):
    """``−lr·r`` of `rules.lamb.apply_step_coefficients` (the CPU step, from the norms
    on the host) and of `trust_step` (each GPU segment, from the norms on the device,
    −lr read from its table) are the same bits: 4096 random pairs of norms and learning
    rates, a zero norm among them."""
    generator = np.random.default_rng(3)
    lamb = rules.lamb
    corrections = generator.uniform(0.01, 1.0, (64, 2))
    for lr in generator.uniform(1e-5, 1e-1, 64):
        squared_norms = generator.uniform(0.0, 1e3, (64, 2)) ** 2
        squared_norms[0, 1] = 0.0
        on_host = lamb.apply_step_coefficients(dtype, corrections, squared_norms, lr)
        table = lamb.apply_step_coefficients_on_device(dtype, corrections, lr)
        on_device = [lamb.trust_step(table[e], squared_norms, e) for e in range(64)]
        np.testing.assert_array_equal(on_host, np.array(on_device, dtype))
        assert on_host[0, 2] == dtype(-lr)  # a zero norm: r = 1


# --- 16-bit parameters: rounded to nearest, master weights, stochastic rounding, Kahan ----

#: mode -> (parameter dtypes, constructor options). Each steps 16-bit parameters (float32
#: for bfloat16 state) and computes in float32; the state is the parameters' dtype but
#: with master weights (float32) and "bf16-state" (float32 parameters, bfloat16 state).
SIXTEEN_BIT_MODES = {
    "nearest": {},
    "master": {"master_weights": True},
    "stochastic": {"stochastic_rounding": True, "rounding_seed": 5},
    "kahan": {"kahan_sum": True},
    "bf16-state": {"state_dtype": torch.bfloat16},
}
SIXTEEN_BIT_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: Shapes, and the scale of each one's gradients: 1e-2 puts float16's exp_avg_sq (about
#: 1e-3·g² at first) below its smallest normal (6e-5), even below its smallest subnormal.
SIXTEEN_BIT_SHAPES = [((48, 33), 1.0), ((33,), 1e-2), ((5, 3, 3, 3), 1.0), ((7,), 1.0)]


def _ulp(values, dtype):
    """The spacing of ``dtype`` (bfloat16, float16, float32) at float64 ``values``."""
    info = torch.finfo(dtype)
    magnitude = values.abs().clamp_min(info.smallest_normal)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def _sixteen_bit_params(dtype):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape, _ in SIXTEEN_BIT_SHAPES]
    params[-1].zero_()  # ‖p‖ = 0: r = 1 (until it moves)
    return [p.requires_grad_() for p in params]


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [(m, d) for m in list(SIXTEEN_BIT_MODES)[:-1] for d in (torch.bfloat16, torch.float16)]
    + [("bf16-state", torch.float32)],
    ids=lambda value: SIXTEEN_BIT_IDS.get(value, value),
)
def test_16_bit_steps_follow_float64_from_their_own_state(mode, dtype, monkeypatch):
    """20 steps, each checked against a float64 step from the optimizer's own state
    before it (so that roundings do not compound), with the trust ratio's norms caught
    as the step computes them:

    - ‖p‖² is that of the float32 value the step moves: ``p`` (rounded to nearest or
      stochastically), the master copy, or ``p + c`` with Kahan's compensation ``c``;
      ‖u‖² is that of ``u`` computed from the moments *as stored* (16-bit state: what
      the update pass reads back); both within 1e-5 of float64 (float32 sums of 64);
    - the stored moments are float64's rounded to the state's format, within one unit
      in its last place (ulp; float32 arithmetic may round across a boundary), and
      float32's rounding of the two terms (where they cancel);
    - the new parameter, from ``y = x − lr·r·u`` in float64 (``x`` the value above):
      nearest within ½ ulp (+ 2⁻²⁰·(|x| + |lr·r·u|) for float32 arithmetic, "slack");
      stochastic one of y's two neighbours, unbiased (mean error within 5σ of 0 over
      every element and step); Kahan ``p + c`` within 2⁻⁹ ulp of y (half the
      compensation's own ulp) + slack + half float16's smallest subnormal; master
      weights: the copy within slack and the parameter the copy rounded.
    """
    options = {"lr": 1e-2, "weight_decay": 0.01, **SIXTEEN_BIT_MODES[mode]}
    state_dtype = {"master": torch.float32, "bf16-state": torch.bfloat16}.get(mode, dtype)
    betas, eps, lr, decay = (0.9, 0.999), 1e-6, options["lr"], options["weight_decay"]
    params = _sixteen_bit_params(dtype)
    optimizer = fastmomentum.LAMB(params, **options)
    caught = []
    apply_step_coefficients = rules.lamb.apply_step_coefficients

    def catch(dtype, corrections, squared_norms, lr):
        caught.append(squared_norms.copy())
        return apply_step_coefficients(dtype, corrections, squared_norms, lr)

    monkeypatch.setattr(rules.lamb, "apply_step_coefficients", catch)
    generator = torch.Generator().manual_seed(1)
    stochastic_errors = []
    for step in range(1, 21):
        before = []
        for param, (_, scale) in zip(params, SIXTEEN_BIT_SHAPES):
            param.grad = (scale * torch.randn(param.shape, generator=generator)).to(dtype)
            state = optimizer.state[param]
            value = param.detach().double()
            if "master_param" in state:
                value = state["master_param"].double()
            if "kahan_comp" in state:
                value = value + state["kahan_comp"].double()
            zero = torch.zeros_like(value)
            moments = [state[k].double() if k in state else zero for k in ("exp_avg", "exp_avg_sq")]
            before.append((value, *moments))
        optimizer.step()
        norms = caught.pop()
        for row, (param, (x, m, v)) in enumerate(zip(params, before)):
            state = optimizer.state[param]
            g = param.grad.double()
            terms = [(betas[0] * m, (1 - betas[0]) * g), (betas[1] * v, (1 - betas[1]) * g * g)]
            m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()  # as stored
            assert state["exp_avg"].dtype == state_dtype
            for name, ours, (old, new) in zip(("exp_avg", "exp_avg_sq"), (m, v), terms):
                # one ulp of the sum, and float32's rounding of its terms (m: they cancel)
                bound = _ulp(old + new, state_dtype) + 2**-22 * (old.abs() + new.abs())
                assert ((ours - (old + new)).abs() <= bound).all(), (step, name, row)
            c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
            u = (m / c1) / ((v / c2).sqrt() + eps) + decay * x
            np.testing.assert_allclose(norms[row], [x.square().sum(), u.square().sum()], rtol=1e-5)
            ratio = float(x.norm() / u.norm()) if x.norm() > 0 and u.norm() > 0 else 1.0
            y = x - lr * ratio * u
            # float32 arithmetic: a few roundings of the terms (y may cancel to near 0)
            new, slack = param.detach().double(), 2**-20 * (x.abs() + lr * ratio * u.abs())
            if mode == "master":
                copy = state["master_param"]
                assert ((copy.double() - y).abs() <= slack).all(), step
                assert torch.equal(param.detach(), copy.to(dtype))
            elif mode == "kahan":
                tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
                bound = 2**-9 * _ulp(y, dtype) + slack + tiny
                assert ((new + state["kahan_comp"].double() - y).abs() <= bound).all(), step
                assert ((new - y).abs() <= _ulp(y, dtype) / 2 + slack).all(), step
            elif mode == "stochastic":
                error = (new - y) / _ulp(y, dtype)
                assert (error.abs() <= 1 + 2**-10).all(), step
                stochastic_errors.append(error.flatten())
            else:
                assert ((new - y).abs() <= _ulp(y, dtype) / 2 + slack).all(), (step, row)
    assert all(float(s["step"]) == 20 for s in optimizer.state.values())
    if stochastic_errors:
        errors = torch.cat(stochastic_errors)
        assert abs(float(errors.mean())) <= 5 * 0.5 / errors.numel() ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_with_8bit_state_the_norm_is_of_u_before_encoding(dtype, monkeypatch):
    """8-bit codes need their block's new absmax, known once the block is stepped: the
    direction pass measures ``‖u‖`` on the new moments before they are encoded, the
    update applies ``u`` from the codes. Over 30 steps the latter's norm stays within
    10% of the former for every tensor (measured: 0.99-1.03; on a small MLP's
    gradients 0.97-1.04)."""
    from fastmomentum import quantized

    params = _sixteen_bit_params(dtype)
    optimizer = fastmomentum.LAMB(params, lr=1e-2, weight_decay=0.01, state_dtype="int8_blockwise")
    caught = []
    apply_step_coefficients = rules.lamb.apply_step_coefficients

    def catch(dtype, corrections, squared_norms, lr):
        caught.append(squared_norms[:, 1].copy())
        return apply_step_coefficients(dtype, corrections, squared_norms, lr)

    monkeypatch.setattr(rules.lamb, "apply_step_coefficients", catch)
    generator = torch.Generator().manual_seed(1)
    ratios = []
    for step in range(1, 31):
        before = [p.detach().double() for p in params]
        for param, (_, scale) in zip(params, SIXTEEN_BIT_SHAPES):
            param.grad = (scale * torch.randn(param.shape, generator=generator)).to(dtype)
        optimizer.step()
        measured = caught.pop()
        for row, (param, x) in enumerate(zip(params, before)):
            state = optimizer.state[param]
            m, v = (
                quantized.dequantize_moment(state[f"{k}_codes"], state[f"{k}_absmax"]).double()
                for k in ("exp_avg", "exp_avg_sq")
            )
            u = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-6) + 0.01 * x
            ratios.append(float(u.norm()) / measured[row] ** 0.5)
    print(f"{dtype}: {min(ratios):.4f} to {max(ratios):.4f}")
    assert 0.9 <= min(ratios) and max(ratios) <= 1.1, (min(ratios), max(ratios))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["fp32", "bf16"])
def test_the_sums_do_not_depend_on_how_threads_split_the_table(dtype, monkeypatch):
    """The float32 sums of squares are summed per chunk of a tensor counted from its
    first element, whatever part of the table a thread takes (segments start at chunk
    boundaries): the threaded loop on one thread and on two, and one tensor alone in its
    table (a bucket of the step in backward, a shard), give each tensor's norms bit for
    bit (float32 and bfloat16 arrays; the split lands inside the large tensor). Not
    held: the serial loop (tables below `config.CPU_SERIAL_BELOW`) against the threaded
    one, which LLVM vectorises apart, so their float32 sums of a chunk may differ in
    the last bit."""
    rng = np.random.default_rng(4)
    lengths = [3000, 70001, 5]
    start = []  # param, grad, m, v of each tensor
    for n in lengths:
        values = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
        values.append(rng.random(n).astype(np.float32))
        if dtype == np.uint16:  # bfloat16 bits: the top half of float32's
            values = [(v.view(np.uint32) >> np.uint32(16)).astype(np.uint16) for v in values]
        start.append(values)
    coefficients = rules.lamb.coefficients(np.dtype(np.float32), (0.9, 0.999), 1e-6, 0.01, False)
    formats = None if dtype == np.float32 else (dtype,) * 4
    sums = []
    monkeypatch.setattr(config, "CPU_SERIAL_BELOW", 0)
    threads = numba.get_num_threads()
    try:
        for parts, entries in ((1, [0, 1, 2]), (2, [0, 1, 2]), (2, [1])):
            numba.set_num_threads(min(parts, threads))
            arrays = [[a.copy() for a in start[e]] for e in entries]  # the pass writes m, v
            table = TensorTable([lengths[e] for e in entries], 4, np.float32, 2, formats)
            for row, columns in enumerate(arrays):
                table.addresses[row] = [array.ctypes.data for array in columns]
            table.entry_values[:] = 1.0
            flags = (dtype == np.uint16, False)
            found = cpu.launch(table, rules.lamb.DIRECTION, coefficients, flags)
            sums.append(dict(zip(entries, found)))
    finally:
        numba.set_num_threads(threads)
    one_thread, two_threads, alone = sums
    for entry in (0, 1, 2):
        assert np.array_equal(one_thread[entry], two_threads[entry]), entry
    assert np.array_equal(one_thread[1], alone[1])


_NORMS_SCRIPT = """
import json
import numpy as np
from fastmomentum.kernels import cpu, rules
from fastmomentum.kernels.calls import one_entry

rng = np.random.default_rng(0)
arrays = [rng.standard_normal(3000).astype(np.float32) for _ in range(4)]
arrays[3] = np.abs(arrays[3])
coefficients = rules.lamb.coefficients(np.float32, (0.9, 0.999), 1e-6, 0.01, False)
corrections = rules.lamb.bias_corrections(np.float32, [3], (0.9, 0.999), True)[0]
table = one_entry(arrays, tuple(corrections))
sums = cpu.launch(table, rules.lamb.DIRECTION, coefficients, (False, False))
print(json.dumps(sums.tolist()))
"""


def test_the_norms_are_the_same_in_every_process(tmp_path):
    """LAMB's sums of squares, in a process that compiles the threaded loop and in one
    that finds it in Numba's on-disk cache: bit for bit the same. (Loaded from the
    cache, the loop used to return float32 chunk sums an ulp apart, so a trust ratio
    depended on which process compiled first: `cpu._variant`.)"""
    import json
    import os

    from .test_packaging import run_python

    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [json.loads(run_python(_NORMS_SCRIPT, env=environment)) for _ in range(2)]
    assert runs[0] == runs[1]
