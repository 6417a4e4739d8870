"""Block-wise 8-bit state in the torch optimizers: against a NumPy reference step by
step, against float32 state over many steps, its layout, resumes and checkpoints in
every direction (those of the earlier signed map refused), what it refuses, and
with fused_zero_grad, deepcopy and new param groups."""

import io

import numpy as np
import pytest
import torch

import fastmomentum
from fastmomentum import quantized
from fastmomentum.kernels import config, quantization

from .cases import OPTIMIZERS, every_optimizer
from .int8_references import (
    OPTIONS,
    SGD_OPTIONS,
    SGD_STATE_KEYS,
    assert_codes_agree,
    empty_state,
    reference_sgd_step,
    reference_step,
)

# --- the optimizers --------------------------------------------------------------------

SHAPES = [(64, 33), (33,), (1,), (2, 3, 4, 5)]


def _params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    params[-1] = params[-1].to(memory_format=torch.channels_last)
    return [p.requires_grad_() for p in params]


def _set_grads(params, generator):
    for param in params:
        grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        param.grad = (
            grad.contiguous(memory_format=torch.channels_last) if param.dim() == 4 else grad
        )


def _codes_of(optimizer, param):
    state = optimizer.state[param]
    return [
        quantized._memory_order(state[key]).numpy().copy() if state[key].dim() else None
        for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
    ]


@pytest.mark.parametrize(
    ("name", "options"),
    [("AdamW", OPTIONS[0]), ("Adam", OPTIONS[1])],
    ids=["adamw", "adam-l2-maximize"],
)
def test_8bit_adam_steps_every_parameter_as_the_reference(name, options):
    params = _params()
    kwargs = {key: options[key] for key in ("lr", "betas", "eps", "weight_decay", "maximize")}
    optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        before = [_codes_of(optimizer, p) if step > 1 else empty_state(p.numel()) for p in params]
        values = [quantized._memory_order(p.detach()).numpy().copy() for p in params]
        _set_grads(params, generator)
        grads = [quantized._memory_order(p.grad).numpy() for p in params]
        optimizer.step()
        for param, value, grad, state in zip(params, values, grads, before):
            wanted, wanted_state = reference_step(value, grad, state, step, **options)
            got = quantized._memory_order(param.detach()).numpy()
            np.testing.assert_allclose(got, wanted, rtol=1e-6, atol=1e-7)
            for got_state, want in zip(_codes_of(optimizer, param), wanted_state):
                if got_state.dtype == np.float32:
                    np.testing.assert_allclose(got_state, want, rtol=1e-6)
                else:
                    assert_codes_agree(got_state, want)
            assert float(optimizer.state[param]["step"]) == step


def _run(optimizer, params, seed, steps):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _set_grads(params, generator)
        optimizer.step()


#: The cases every optimizer with 8-bit state runs (RMSprop not centered: refused).
every_8bit_optimizer = every_optimizer(
    lambda info: info.supports_quantized_state,
    cases={"SGD": ("sgd", "nesterov"), "Adam": ("adam-amsgrad",), "RMSprop": ("rmsprop-momentum",)},
)


def _moments_of(optimizer, param):
    """The state names ``state[param]`` holds as codes and absmax."""
    state = optimizer.state[param]
    return [name for name, (codes, _, _) in quantized.MOMENTS.items() if codes in state]


def _noisy_quadratic(name, options, state_dtype, steps):
    """``steps`` steps on ``½‖p − target‖²`` with Gaussian noise of std 0.5 in each
    gradient (the same targets and noise for every run); the params before and after."""
    generator = torch.Generator().manual_seed(0)
    shapes = [*SHAPES, (300,), (0,)]
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    targets = [torch.randn(shape, generator=generator) for shape in shapes]
    start = [p.detach().clone() for p in params]
    optimizer = getattr(fastmomentum, name)(params, state_dtype=state_dtype, **options)
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param, target in zip(params, targets):
            param.grad = param.detach() - target + 0.5 * torch.randn(param.shape, generator=noise)
        optimizer.step()
    return start, [p.detach() for p in params]


@every_8bit_optimizer
def test_8bit_state_trains_as_float32_state(name, options):
    """200 steps from the same start, the same gradients (a noisy quadratic), against
    float32 state: each tensor ends within 10% of the distance the float32 run moved it.

    Why 10%: a second moment's code is within 1/16 of its value, so its square root, what
    a step divides by, within 1/32; a first moment's (a momentum buffer's) within 1/254
    of its block's largest magnitude (`kernels.quantization`), so the steps of a block's
    largest elements, which move a tensor most, within about 0.4% where small ones may
    round to zero: a step from 8-bit state is within a few percent of float32 state's,
    and the states' averages keep such errors from adding up. Measured: 0.5-6.1% (SGD ≈ 1%, the
    Adam family, Adagrad and LAMB 2-6%); a one-element tensor (its block's absmax, kept
    exactly) 0. Lion's step is ±lr, the sign of ``β1·m + (1 − β1)·g``: an 8-bit ``m``
    flips it where that is within about ``|β1·m|/16`` of zero, a whole ``2·lr`` apart;
    measured 3.6-8.2% at its case's lr (1e-3), while it travels to the target; at
    lr 1e-2, half the run at its noise floor, 4.5-21%."""
    start, full = _noisy_quadratic(name, options, None, 200)
    _, low = _noisy_quadratic(name, options, "int8_blockwise", 200)
    for first, want, got in zip(start, full, low):
        moved = float((want - first).norm())
        assert moved > 0 or first.numel() == 0
        assert float((got - want).norm()) <= 0.1 * moved, (name, tuple(first.shape))


@every_8bit_optimizer
def test_8bit_state_pieces_keep_the_parameters_layout_and_a_storage_each(name, options):
    params = _params()
    optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **options)
    _run(optimizer, params, seed=1, steps=1)
    storages = set()
    for param in params:
        state = optimizer.state[param]
        moments = _moments_of(optimizer, param)
        assert moments and set(state) == {*optimizer.scalar_state, *quantized.keys(moments)}
        for moment in moments:
            codes, absmax, signed = quantized.MOMENTS[moment]
            assert state[codes].dtype == (torch.int8 if signed else torch.uint8)
            assert state[codes].stride() == param.stride()
            assert state[absmax].shape == (quantization.blocks(param.numel()),)
            assert state[absmax].dtype == torch.float32
        storages.update(value.untyped_storage().data_ptr() for value in state.values())
    assert len(storages) == sum(len(optimizer.state[p]) for p in params)  # each its own


@every_8bit_optimizer
def test_an_8bit_run_resumes_bit_identically_from_its_checkpoint(name, options):
    info = OPTIMIZERS[name]
    # bfloat16 params (the absmax stays float32), but not for NAdam: torch's load casts
    # its mu_product to the params' dtype (torch.optim.NAdam's resume too)
    bfloat16 = info.steps(torch.bfloat16) and set(info.scalar_state) == {"step"}
    for dtype in [torch.float32] + [torch.bfloat16] * bfloat16:
        params = _params(dtype)
        make = getattr(fastmomentum, name)
        optimizer = make(params, state_dtype="int8_blockwise", **options)
        _run(optimizer, params, seed=1, steps=3)
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        twins = [p.detach().clone().requires_grad_() for p in params]
        resumed = make(twins, state_dtype="int8_blockwise", **options)
        buffer.seek(0)
        resumed.load_state_dict(torch.load(buffer))
        _assert_same_state(optimizer, params, resumed, twins)
        _run(optimizer, params, seed=2, steps=3)
        _run(resumed, twins, seed=2, steps=3)
        assert all(torch.equal(p, t) for p, t in zip(params, twins))
        _assert_same_state(optimizer, params, resumed, twins)


def _assert_same_state(optimizer, params, other, other_params):
    for param, twin in zip(params, other_params):
        assert set(other.state[twin]) == set(optimizer.state[param])
        for key, value in optimizer.state[param].items():
            assert torch.equal(other.state[twin][key], value), key


@every_8bit_optimizer
def test_8bit_checkpoints_convert_both_ways_and_torch_loads_them_decoded(name, options):
    """A float32 checkpoint (torch.optim's where it has the optimizer) loads into 8-bit
    state quantized block by block, as a step would store it; an 8-bit one loads into
    float32 state decoded: ours directly, torch's through `dequantized_state_dict`."""
    params = _params()
    info = OPTIMIZERS[name]
    library = torch.optim if info.peer is not None else fastmomentum
    full = getattr(library, name)(params, **options)
    _run(full, params, seed=1, steps=3)
    low = info.cls(params, state_dtype="int8_blockwise", **options)
    low.load_state_dict(full.state_dict())
    for param in params:
        moments = _moments_of(low, param)
        assert moments
        for moment in moments:
            codes, absmax, signed = quantized.MOMENTS[moment]
            wanted = quantized.quantize_moment(full.state[param][moment], param.stride(), signed)
            assert torch.equal(low.state[param][codes], wanted[0])
            assert torch.equal(low.state[param][absmax], wanted[1])
        for scalar in low.scalar_state:  # step, mu_product
            assert torch.equal(low.state[param][scalar], full.state[param][scalar])
    saved = low.state_dict()
    decoded = fastmomentum.dequantized_state_dict(saved)
    kept = [key for key in saved["state"][0] if key not in low.scalar_state]
    assert kept and all(key.endswith(("_codes", "_absmax")) for key in kept)
    targets = [(info.cls(params, **options), saved)]
    if info.peer is not None:
        targets.append((info.peer(params, **options), decoded))
    for target, state_dict in targets:
        target.load_state_dict(state_dict)
        for param in params:
            state = low.state[param]
            for moment in _moments_of(low, param):
                codes, absmax, _ = quantized.MOMENTS[moment]
                wanted = quantized.dequantize_moment(state[codes], state[absmax])
                assert torch.equal(target.state[param][moment], wanted)
                assert target.state[param][moment].stride() == param.stride()
        _run(target, params, seed=3, steps=1)  # and steps on


def test_8bit_checkpoints_of_the_earlier_signed_code_map_are_refused_untouched():
    """State dicts name their code maps in their groups; one with signed codes and no
    name holds the tiny-float codes of fastmomentum before the linear map, which this
    version would misread: every way of loading it refuses it, changing nothing."""
    params = _params()
    adam = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _run(adam, params, seed=1, steps=2)
    saved = adam.state_dict()
    assert all(g[quantized.CODE_MAPS_KEY] == quantized.CODE_MAPS for g in saved["param_groups"])
    assert quantized.CODE_MAPS_KEY not in adam.param_groups[0]  # only in what is saved
    old = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    for group in old["param_groups"]:
        del group[quantized.CODE_MAPS_KEY]
    before = [state["exp_avg_codes"].clone() for state in adam.state.values()]
    for target in (adam, fastmomentum.Adam(params)):
        with pytest.raises(ValueError, match="tiny float used before the linear map"):
            target.load_state_dict(old)
    with pytest.raises(ValueError, match="dequantized_state_dict"):
        fastmomentum.dequantized_state_dict(old)
    after = [state["exp_avg_codes"] for state in adam.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    adam.load_state_dict(saved)  # its own state dict loads, and a float32 one without codes
    fastmomentum.Adam(params, state_dtype="int8_blockwise").load_state_dict(
        fastmomentum.dequantized_state_dict(saved)
    )


def test_8bit_adagrad_starts_every_sum_at_the_initial_value():
    params = _params()
    optimizer = fastmomentum.Adagrad(
        params, initial_accumulator_value=0.3, state_dtype="int8_blockwise"
    )
    for param in params:  # from construction, as torch's: the top code on absmax 0.3
        state = optimizer.state[param]
        wanted = torch.full(param.shape, 0.3, dtype=torch.float32)
        sums = quantized.dequantize_moment(state["sum_codes"], state["sum_absmax"])
        assert torch.equal(sums, wanted)
        assert (state["sum_codes"] == 255).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: fastmomentum.RMSprop(p, centered=True, state_dtype="int8_blockwise"),
         "centered=True is not implemented"),
        (lambda p: fastmomentum.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                                     state_dtype="int8_blockwise"),
         "is for float32, bfloat16, float16 parameters"),
        (lambda p: fastmomentum.LAMB([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                                     state_dtype="int8_blockwise"),
         "is for float32, bfloat16, float16 parameters"),
        (lambda p: fastmomentum.LAMB([p[0].detach().bfloat16().requires_grad_()],
                                     master_weights=True, state_dtype="int8_blockwise"),
         "master_weights"),
        (lambda p: fastmomentum.Adam(p, master_weights=True, state_dtype="int8_blockwise"),
         "master_weights"),
        (lambda p: fastmomentum.Adam(p, state_dtype="int4"), "state_dtype must be None"),
    ],
    ids=["rmsprop-centered", "float64", "lamb-float64", "lamb-master", "master", "int4"],
)  # fmt: skip
def test_what_8bit_state_cannot_do_is_refused_before_anything_moves(make, message):
    params = [torch.randn(5, 3).requires_grad_()]
    before = (params[0].data_ptr(), params[0].detach().clone())
    with pytest.raises(ValueError, match=message):
        make(params)
    assert params[0].data_ptr() == before[0] and torch.equal(params[0].detach(), before[1])


def test_centered_switched_on_later_is_refused_before_the_step_moves_anything():
    params = _params()
    optimizer = fastmomentum.RMSprop(params, momentum=0.9, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=1)
    saved = optimizer.state_dict()
    values = [p.detach().clone() for p in params]
    optimizer.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered"):
        optimizer.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    optimizer.param_groups[0]["centered"] = False
    saved["param_groups"][0]["centered"] = True
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    with pytest.raises(ValueError, match="centered"):
        optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0]["centered"]
    assert all(torch.equal(optimizer.state[params[0]][k], v) for k, v in state.items())


def test_amsgrad_switched_on_later_starts_its_8bit_maximum_at_zero():
    """As with float32 state (where torch raises KeyError): the first AMSGrad step's
    maximum is max(0, v) = v, so its codes and absmax are ``exp_avg_sq``'s."""
    params = _params()
    optimizer = fastmomentum.Adam(params, state_dtype="int8_blockwise")
    _run(optimizer, params, seed=1, steps=2)
    assert "max_exp_avg_sq_codes" not in optimizer.state[params[0]]
    optimizer.param_groups[0]["amsgrad"] = True
    _run(optimizer, params, seed=2, steps=1)
    for param in params:
        state = optimizer.state[param]
        assert torch.equal(state["max_exp_avg_sq_codes"], state["exp_avg_sq_codes"])
        assert torch.equal(state["max_exp_avg_sq_absmax"], state["exp_avg_sq_absmax"])
    optimizer.param_groups[0]["amsgrad"] = False  # kept, as torch keeps max_exp_avg_sq
    _run(optimizer, params, seed=3, steps=1)
    assert "max_exp_avg_sq_codes" in optimizer.state_dict()["state"][0]


@pytest.mark.cudasim
@every_8bit_optimizer
def test_the_torch_optimizers_step_8bit_state_with_the_cuda_kernels(name, options, monkeypatch):
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        params = [p.detach()[:2].clone().requires_grad_() for p in _params()[:2]]
        optimizer = getattr(fastmomentum, name)(params, state_dtype="int8_blockwise", **options)
        _run(optimizer, params, seed=1, steps=2)
        results.append((params, [optimizer.state[p] for p in params]))
    for param_cpu, param_cuda in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(param_cuda, param_cpu, rtol=1e-6, atol=1e-7)
    for state_cpu, state_cuda in zip(results[0][1], results[1][1]):
        assert set(state_cuda) == set(state_cpu)
        for key, value in state_cpu.items():
            got, want = state_cuda[key].numpy(), value.numpy()
            if got.dtype == np.float32:
                np.testing.assert_allclose(got, want, rtol=1e-6)
            else:
                assert_codes_agree(got.reshape(-1), want.reshape(-1))


def _sgd_state_of(optimizer, param):
    state = optimizer.state[param]
    return [quantized._memory_order(state[key]).numpy().copy() for key in SGD_STATE_KEYS]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=["nesterov-l2", "dampened-lr-folded"])
def test_8bit_sgd_steps_every_parameter_as_the_reference(options):
    params = _params()
    kwargs = {k: v for k, v in options.items() if k != "convention"}
    optimizer = fastmomentum.SGD(
        params, momentum_convention=options["convention"], state_dtype="int8_blockwise", **kwargs
    )
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        before = [
            _sgd_state_of(optimizer, p) if step > 1 else empty_state(p.numel())[:2] for p in params
        ]
        values = [quantized._memory_order(p.detach()).numpy().copy() for p in params]
        _set_grads(params, generator)
        grads = [quantized._memory_order(p.grad).numpy() for p in params]
        optimizer.step()
        for param, value, grad, state in zip(params, values, grads, before):
            wanted, wanted_state = reference_sgd_step(value, grad, state, step == 1, **options)
            got = quantized._memory_order(param.detach()).numpy()
            np.testing.assert_allclose(got, wanted, rtol=1e-6, atol=1e-7)
            codes, absmax = _sgd_state_of(optimizer, param)
            assert_codes_agree(codes, wanted_state[0])
            np.testing.assert_allclose(absmax, wanted_state[1], rtol=1e-6)


def test_8bit_state_goes_with_fused_zero_grad_deepcopy_and_new_param_groups():
    import copy

    params = _params()
    optimizer = fastmomentum.Adam(params[:2], lr=1e-2, state_dtype="int8_blockwise")
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = fastmomentum.Adam(
        twins[:2], lr=1e-2, state_dtype="int8_blockwise", fused_zero_grad=True
    )
    for optim, group in ((optimizer, params), (fused, twins)):
        optim.add_param_group({"params": group[2:], "lr": 3e-3})
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for param, twin, grad in zip(params, twins, grads):
            param.grad, twin.grad = grad.clone(), grad.clone()
        optimizer.step()
        fused.step()
        assert all((t.grad == 0).all() for t in twins)  # zeroed in the same pass
    copied = copy.deepcopy(optimizer)
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin)
        for key, value in optimizer.state[param].items():
            assert torch.equal(fused.state[twin][key], value)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    for param, copy_param in zip(params, copied_params):
        for key, value in optimizer.state[param].items():
            assert torch.equal(copied.state[copy_param][key], value)
        assert copied.state[copy_param]["exp_avg_codes"].data_ptr() != (
            optimizer.state[param]["exp_avg_codes"].data_ptr()
        )
