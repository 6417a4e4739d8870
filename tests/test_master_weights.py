"""float32 master weights for 16-bit parameters (``master_weights=True``): the copy steps
as float32 parameters would and is rounded into the parameter; resumes, torch loading
such a checkpoint, writes by others, refusals, the CUDA kernels."""

import pytest
import torch

import fastmomentum
from fastmomentum.kernels import config

from .sixteen_bits import FORMATS, IDS, assert_close

# --- float32 master weights for 16-bit parameters ---------------------------------------


def _master_twins(name, dtype, options=None, seed=0, shapes=((64, 33), (33,))):
    """16-bit params with ``master_weights=True``, and float32 params holding the same
    values under our float32 optimizer: the master copies must follow the latter."""
    options = {"lr": 1e-2, **(options or {})}
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    low = [v.clone().requires_grad_() for v in values]
    full = [v.float().requires_grad_() for v in values]
    return (
        (low, getattr(fastmomentum, name)(low, master_weights=True, **options)),
        (full, getattr(fastmomentum, name)(full, **options)),
    )


def _step_master_twins(low, full, steps, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(low[0], full[0]):
            grad = torch.randn(p.shape, generator=generator).to(dtype)
            p.grad, q.grad = grad, grad.float()
        low[1].step()
        full[1].step()


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("Adam", {"weight_decay": 0.1}),
        ("AdamW", {"amsgrad": True}),
        ("SGD", {"momentum": 0.9, "weight_decay": 0.01}),
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("SGD", {}),
        ("NAdam", {"weight_decay": 0.01}),
        ("RAdam", {"weight_decay": 0.01}),
        ("Adamax", {"weight_decay": 0.01}),
        ("RMSprop", {"momentum": 0.9, "centered": True, "lr": 1e-3}),
        ("Adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
        ("LAMB", {"weight_decay": 0.01}),
        ("Lion", {"weight_decay": 0.01}),
    ],
    ids=["adam", "adamw-amsgrad", "sgd-momentum", "sgd-nesterov", "sgd-plain", "nadam",
         "radam", "adamax", "rmsprop", "adagrad", "lamb", "lion"],
)  # fmt: skip
def test_master_weights_step_a_float32_copy_and_round_it_into_the_param(
    name, options, dtype, carrier
):
    low, full = _master_twins(name, dtype, options)
    _step_master_twins(low, full, 10, dtype)
    for p, q in zip(low[0], full[0]):
        state = low[1].state[p]
        assert state["master_param"].dtype == torch.float32
        assert torch.equal(state["master_param"], q.detach())  # our float32 step, bit for bit
        assert torch.equal(p.detach(), q.detach().to(dtype))  # the param is the copy rounded
        for key, value in full[1].state[q].items():  # float32 state, equal to float32's
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.mark.parametrize(("dtype", "carrier"), FORMATS, ids=IDS)
@pytest.mark.parametrize(
    ("name", "options"),
    [("AdamW", {}), ("NAdam", {"weight_decay": 0.01}), ("LAMB", {"weight_decay": 0.01}),
     ("RMSprop", {"momentum": 0.9, "centered": True, "lr": 1e-3}), ("SGD", {"momentum": 0.9})],
    ids=["adamw", "nadam", "lamb", "rmsprop", "sgd-momentum"],
)  # fmt: skip
def test_master_weights_at_the_size_of_a_layer(name, options, dtype, carrier):
    """As above, on 2^20 + 77 elements, 5 steps: the threaded loops, LAMB's sums over
    many chunks; the copy still our float32 step bit for bit."""
    low, full = _master_twins(name, dtype, options, shapes=[(1024, 1024), (77,)])
    _step_master_twins(low, full, 5, dtype)
    for p, q in zip(low[0], full[0]):
        assert torch.equal(low[1].state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), q.detach().to(dtype))


def test_master_weights_resume_bit_identically_and_torch_can_load_them():
    dtype = torch.bfloat16
    low, full = _master_twins("Adam", dtype)
    _step_master_twins(low, full, 4, dtype)
    saved = low[1].state_dict()
    assert saved["state"][0]["master_param"].dtype == torch.float32
    params = [p.detach().clone().requires_grad_() for p in low[0]]
    resumed = fastmomentum.Adam(params, lr=1e-2, master_weights=True)
    resumed.load_state_dict(saved)
    generator = torch.Generator().manual_seed(5)
    for _ in range(4):
        for p, q in zip(low[0], params):
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            q.grad = p.grad.clone()
        low[1].step()
        resumed.step()
    for p, q in zip(low[0], params):
        assert torch.equal(p, q)
        assert torch.equal(low[1].state[p]["master_param"], resumed.state[q]["master_param"])
    # torch.optim takes the checkpoint, casts the extra entry to the param's dtype, and
    # never reads it
    theirs = torch.optim.Adam([p.detach().clone().requires_grad_() for p in low[0]], lr=1e-2)
    theirs.load_state_dict(saved)
    assert theirs.state[theirs.param_groups[0]["params"][0]]["master_param"].dtype == dtype


def test_a_parameter_written_by_someone_else_is_copied_into_the_master_again():
    """``model.load_state_dict`` after some steps: the master copy follows the new
    values (torch's version counter tells), no update of the loaded weights is lost."""
    dtype = torch.bfloat16
    model = torch.nn.Linear(5, 3).to(dtype)
    optimizer = fastmomentum.Adam(model.parameters(), lr=1e-2, master_weights=True)
    for _ in range(3):
        model(torch.randn(4, 5).to(dtype)).float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = torch.nn.Linear(5, 3).to(dtype).state_dict()
    model.load_state_dict(fresh)
    model.weight.grad = torch.zeros_like(model.weight)  # a step that moves nothing...
    optimizer.step()
    # ...but Adam's moments still move the weight: it must move from the loaded values
    master = optimizer.state[model.weight]["master_param"]
    assert (master - fresh["weight"].float()).abs().max() < 0.05
    assert torch.equal(model.weight.detach(), master.to(dtype))


def test_sgd_without_momentum_keeps_its_master_copies_across_a_checkpoint():
    """Its state is the master copy alone; momentum switched on later starts the buffer
    as torch does (from the first gradient), as the float32 twin's does."""
    dtype = torch.bfloat16
    low, full = _master_twins("SGD", dtype, {"lr": 0.1})
    _step_master_twins(low, full, 2, dtype)
    assert list(low[1].state_dict()["state"][0]) == ["master_param"]
    low[1].load_state_dict(low[1].state_dict())
    _step_master_twins(low, full, 2, dtype, seed=3)
    for optimizer in (low[1], full[1]):
        optimizer.param_groups[0]["momentum"] = 0.9
    _step_master_twins(low, full, 3, dtype, seed=4)
    for p, q in zip(low[0], full[0]):
        assert torch.equal(low[1].state[p]["master_param"], q.detach())
        assert torch.equal(low[1].state[p]["momentum_buffer"], full[1].state[q]["momentum_buffer"])


@pytest.mark.parametrize(
    ("param_dtype", "extra", "message"),
    [
        (torch.float32, {}, "master_weights=True is for bfloat16 and float16"),
        (torch.bfloat16, {"state_dtype": torch.bfloat16}, "keeps float32 state"),
    ],
)
def test_master_weights_we_cannot_keep_are_refused_before_anything_moves(
    param_dtype, extra, message
):
    param = torch.randn(5).to(param_dtype).requires_grad_()
    before = (param.data_ptr(), param.detach().clone())
    with pytest.raises(ValueError, match=message):
        fastmomentum.Adam([param], master_weights=True, **extra)
    assert param.data_ptr() == before[0] and torch.equal(param.detach(), before[1])


@pytest.mark.cudasim
def test_the_cuda_kernels_step_master_weights_as_the_cpu_kernels(monkeypatch):
    dtype = torch.bfloat16
    results = []
    for force_cuda in (False, True):
        monkeypatch.setattr(config, "FORCE_CUDA", force_cuda)
        low, full = _master_twins("AdamW", dtype)
        _step_master_twins(low, full, 2, dtype)
        results.append([(p.detach(), low[1].state[p]["master_param"]) for p in low[0]])
    for (p_cpu, m_cpu), (p_cuda, m_cuda) in zip(*results):
        # the CPU loop divides by a reciprocal (arcp, ≤1 ulp in float32)
        assert torch.allclose(m_cuda, m_cpu, rtol=1e-6, atol=0)
        assert_close(p_cuda, p_cpu, False, "param")


def test_a_master_weights_checkpoint_loads_without_master_weights():
    """The master copies are dropped (the parameters hold them rounded); the moments load."""
    dtype = torch.bfloat16
    low, full = _master_twins("Adam", dtype)
    _step_master_twins(low, full, 3, dtype)
    saved = low[1].state_dict()
    params = [p.detach().clone().requires_grad_() for p in low[0]]
    plain = fastmomentum.Adam(params, lr=1e-2)
    plain.load_state_dict(saved)
    state = plain.state_dict()["state"][0]
    assert "master_param" not in state
    assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"].to(dtype))
