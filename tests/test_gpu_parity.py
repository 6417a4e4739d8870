"""`bench.gpu_parity` without a GPU: the references and bounds of `python -m
bench.gpu_check`'s parity part, and its plumbing on the CPU.

The ``rounding`` bound is checked against an emulation of torch's fused CUDA Adam
(``adam_math`` in torch's ``fused_adam_utils.cuh``: float32 arithmetic, nvcc's
``fma(β1, m, (1−β1)·g)``): on an H200 our step was that far from torch's (bf16
``exp_avg`` 76.9 steps of one element, fp16 5.29: the emulation gives the same numbers on
gpu_check's data), and a wrong step is not within it.
"""

import numpy as np
import pytest
import torch

from bench import gpu_parity

SHAPES = [(64, 33), (257,), (1,)]


def small_data(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=generator).to(dtype) for s in SHAPES]
    steps = range(gpu_parity.STEPS)
    grads = [[torch.randn(s, generator=generator).to(dtype) for s in SHAPES] for _ in steps]
    return start, grads


def _fma(a, b, c):
    """a·b + c rounded once to float32 (a·b of two float32 is exact in float64)."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def torch_cuda_adam(start, grads, dtype, beta1=0.9, beta2=0.999, lr=1e-3, eps=1e-8):
    """torch's fused CUDA Adam on 16-bit parameters, emulated: each step in float32 (its
    opmath type), ``m`` and ``v`` contracted as nvcc does, the parameter stepped by their
    float32 values, all three stored in ``dtype``; the tensors by `gpu_parity.tensors`'
    names."""
    f32 = np.float32
    b1, b2, one = f32(beta1), f32(beta2), f32(1)
    params = [s.float().numpy() for s in start]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]

    def stored(x):
        return torch.from_numpy(np.asarray(x, f32)).to(dtype)

    for t, step in enumerate(grads, 1):
        step_size = f32(f32(lr) / f32(one - f32(np.power(b1, f32(t)))))
        correction2 = f32(np.sqrt(f32(one - f32(np.power(b2, f32(t))))))
        for i, grad in enumerate(step):
            g = grad.float().numpy()
            exp_avg = _fma(b1, m[i], f32(one - b1) * g)
            exp_avg_sq = _fma(b2, v[i], f32(f32(one - b2) * g) * g)
            denominator = np.sqrt(exp_avg_sq) / correction2 + f32(eps)  # before they are stored
            params[i] = stored(params[i] - step_size * exp_avg / denominator).float().numpy()
            m[i], v[i] = (stored(x).float().numpy() for x in (exp_avg, exp_avg_sq))
    out = {}
    for i in range(len(params)):
        out[f"p{i}"], out[f"p{i}.exp_avg"] = stored(params[i]), stored(m[i])
        out[f"p{i}.exp_avg_sq"] = stored(v[i])
    return out


def ours_on_the_cpu(dtype, start, grads):
    check = gpu_parity.Check("Adam", "Adam", {"lr": 1e-3}, "bf16", dtype, {})
    params, optimizer, _ = gpu_parity.side(check, "cpu", start, grads)
    return gpu_parity.tensors(params, optimizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_s_cuda_rounding_of_adam_is_within_the_rounding_bound(dtype):
    """Per tensor, within ``STEPS`` 16-bit steps of its largest value; the per-element
    bound (``rtol``: one step each, ≤ 1% of elements differing) fails it: about 7% of
    ``exp_avg`` differs."""
    start, grads = small_data(dtype)
    theirs, ours = torch_cuda_adam(start, grads, dtype), ours_on_the_cpu(dtype, start, grads)
    assert theirs.keys() <= ours.keys()  # and each parameter's step count
    for key, value in theirs.items():
        steps, within = gpu_parity.compare(ours[key], value, "rounding", "Adam", "torch fused")
        assert within, (key, steps)
    apart = gpu_parity.elements_apart(ours["p0.exp_avg"], theirs["p0.exp_avg"])
    assert 0.02 < apart / theirs["p0.exp_avg"].numel() < 0.2
    _, within = gpu_parity.compare(ours["p0.exp_avg"], theirs["p0.exp_avg"], "rtol", "Adam")
    assert not within


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_wrong_step_is_not_within_the_rounding_bound(dtype):
    """β1 = 0.85 where the step was asked for 0.9: ``exp_avg`` is out of bound."""
    start, grads = small_data(dtype)
    wrong = torch_cuda_adam(start, grads, dtype, beta1=0.85)
    ours = ours_on_the_cpu(dtype, start, grads)
    steps, within = gpu_parity.compare(ours["p0.exp_avg"], wrong["p0.exp_avg"], "rounding", "Adam")
    assert not within and steps > 2 * gpu_parity.STEPS


def test_sixteen_bit_parameters_against_torch_are_bound_by_rounding():
    """Only where ours is compared with torch's CUDA step on 16-bit tensors: not with
    master weights (float32 twins) nor against our own CPU step (16-bit state, SR)."""
    bounds = {(c.name, c.mode): gpu_parity.bound_of(c) for c in gpu_parity.checks()}
    rounding = {key for key, bound in bounds.items() if bound == "rounding"}
    assert rounding == {
        (name, mode) for name in ("SGD", "Adam", "AdamW") for mode in ("bf16", "fp16")
    }
    assert bounds["Adam", "bf16 master weights"] == "rtol"
    assert bounds["Adam", "bf16 state"] == "bits"  # against our CPU step


def test_against_our_cpu_step_bits_but_where_sums_add_in_another_order():
    """Our CUDA and CPU steps compute each rule as written (no contraction), so they
    must agree bit for bit, but LAMB's norms and Muon's matrix products, summed in
    another order on the GPU."""
    for check in gpu_parity.checks():
        if gpu_parity.reference_of(check) == "our CPU step":
            summed = check.name in gpu_parity.SUMMED_IN_ANOTHER_ORDER
            assert gpu_parity.bound_of(check) == ("rtol" if summed else "bits"), check
    names = {c.name for c in gpu_parity.checks() if gpu_parity.bound_of(c) == "bits"}
    assert {"Lion", "Adagrad", "SGD", "Adam"} <= names


def test_a_capturable_mode_s_cpu_reference_is_the_ordinary_step():
    """LAMB and Lion have no torch peer: their capturable mode is checked against our CPU
    step, which CPU parameters must build without ``capturable`` (on an H200 the check
    raised "capturable=True steps parameters on a CUDA device" instead)."""
    found = [c for c in gpu_parity.checks() if c.mode == "capturable"]
    on_cpu = [c for c in found if gpu_parity.reference_of(c) == "our CPU step"]
    assert {c.name for c in on_cpu} >= {"LAMB", "Lion"}
    for check in on_cpu:
        start = [torch.randn(5, 3), torch.randn(0, 3)]
        grads = [[torch.randn(5, 3), torch.randn(0, 3)] for _ in range(2)]
        params, optimizer, used = gpu_parity.side(check, "cpu", start, grads, "our CPU step")
        assert used == "our CPU step" and not optimizer.defaults.get("capturable")
        assert not torch.equal(params[0].detach(), start[0])


def test_adagrad_is_checked_against_torch_foreach_on_cuda():
    """torch's fused Adagrad steps CPU tensors only (it raises on CUDA ones at the step)."""
    assert gpu_parity.torch_kind("Adagrad") == "foreach"
    assert gpu_parity.torch_kind("Adam") == "fused"


def test_the_worst_names_the_first_tensor_out_of_bound():

    worst = gpu_parity.Worst()
    worst.add("p0", 1e-7, True)
    worst.add("p0.exp_avg", 3e-7, True)
    assert worst.passed and worst.text == "3.00e-07 (p0.exp_avg)"
    worst.add("p1", 2e-5, False)
    worst.add("p1.exp_avg", 1e-6, True)  # within: does not hide the failure
    assert not worst.passed and worst.text == "2.00e-05 (p1)"


def test_bits_apart_counts_every_element_not_the_same_bits():
    """NaN is NaN; 0.0 and -0.0 are apart; a tensor of another shape is apart whole; a
    tensor the reference has and ours does not is skipped. `compare`'s ``bits`` counts
    alike, and a NaN where the reference has one is no failure (``torch.equal`` of two
    NaNs is False, which failed every bound)."""
    nan = float("nan")
    wanted = {
        "p0": torch.tensor([1.0, nan, 0.0, 2.0]),
        "p0.codes": torch.tensor([3, -4, 5], dtype=torch.int8),
        "p1": torch.zeros(2, 3, dtype=torch.bfloat16),
        "p1.exp_avg": torch.ones(9),
    }
    mine = {
        "p0": torch.tensor([1.0, nan, -0.0, 2.0]),
        "p0.codes": torch.tensor([3, -4, 6], dtype=torch.int8),
        "p1": torch.zeros(3, 2, dtype=torch.bfloat16),
    }
    assert gpu_parity.bits_apart(mine, wanted) == "8 of 13"
    assert gpu_parity.bits_apart(wanted, wanted) == "0 of 22"
    assert gpu_parity.compare(mine["p0"], wanted["p0"], "bits", "Adam") == (1.0, False)
    assert gpu_parity.compare(wanted["p0"], wanted["p0"], "bits", "Adam") == (0.0, True)
    inf = torch.tensor([float("inf"), 1.0])
    assert gpu_parity.compare(inf, torch.tensor([nan, 1.0]), "rtol", "Adam") == (
        float("inf"),
        False,
    )


def test_a_parity_row_reports_its_bits_apart(monkeypatch, tmp_path):
    """The plumbing, on the CPU (a GPU run steps ours on CUDA, where this count is the
    question): our step against our CPU step, 10 steps of random data, the parameters
    and bf16 ``exp_avg`` counted; and the table's row has a cell per column."""
    from bench import gpu_check

    shapes = [(7, 3), (5,)]
    generator = torch.Generator().manual_seed(1)
    small = (
        [torch.randn(s, generator=generator) for s in shapes],
        [[torch.randn(s, generator=generator) for s in shapes] for _ in range(gpu_parity.STEPS)],
    )
    monkeypatch.setattr(gpu_parity, "data", lambda check: small)
    lion = gpu_parity.Check("Lion", "Lion", {"lr": 1e-3}, "bf16 state", torch.float32, {})
    lion = lion._replace(extra={"state_dtype": torch.bfloat16})
    used, _, passed, apart = gpu_parity.parity(lion, "cpu")
    assert (used, passed, apart) == ("our CPU step", True, "0 of 52")
    found = [c for c in gpu_parity.checks() if c.name == "Lion"]

    def cells(index):
        return gpu_parity.parity(lion, "cpu")

    monkeypatch.setattr(gpu_check, "parity_cells", cells)
    report = gpu_check.Report(tmp_path / "gpu_check.md", ["# GPU check"])
    assert gpu_check.parity_part(report, jobs=1, only={"Lion"}) == 0
    header, rows = report.lines[-len(found) - 2], report.lines[-len(found) :]
    assert all(row.count("|") == header.count("|") and "| 0 of 52 | ok |" in row for row in rows)


def test_a_kahan_pair_is_compared_by_the_value_it_holds():
    """Rounded to adjacent bfloat16 values, two parameters' compensations differ by a
    whole step, their sums not at all: `kahan_sums` compares the sums."""
    bf16 = torch.bfloat16
    ours = {
        "p0": torch.tensor([1.0], dtype=bf16),
        "p0.kahan_comp": torch.tensor([2**-8 + 2**-12], dtype=bf16),
    }
    theirs = {
        "p0": torch.tensor([1 + 2**-7], dtype=bf16),
        "p0.kahan_comp": torch.tensor([-(2**-8) + 2**-12], dtype=bf16),
    }
    _, within = gpu_parity.compare(ours["p0.kahan_comp"], theirs["p0.kahan_comp"], "rtol", "LAMB")
    assert not within
    mine, wanted = gpu_parity.kahan_sums(ours), gpu_parity.kahan_sums(theirs)
    assert set(mine) == {"p0", "p0+kahan_comp"}
    assert gpu_parity.compare(mine["p0+kahan_comp"], wanted["p0+kahan_comp"], "rtol", "LAMB") == (
        0.0,
        True,
    )


def test_parity_sums_16_bit_products_in_float32_and_restores_the_setting(monkeypatch):
    """Muon's Newton–Schulz multiplies in bfloat16: a parity check runs with cuBLAS's
    16-bit partial sums off (`products_summed_in_float32`), and leaves torch's setting
    as it found it, a step that raises included."""
    matmul = torch.backends.cuda.matmul

    def settings():
        return (
            matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction,
        )

    seen = []

    def failing_step(check, device):
        seen.append(settings())
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(gpu_parity, "_parity", failing_step)
    muon = next(c for c in gpu_parity.checks() if c.name == "Muon" and c.mode == "fp16")
    assert settings() == (True, True)  # torch's defaults
    with pytest.raises(RuntimeError, match="a step that fails"):
        gpu_parity.parity(muon, "cpu")
    assert seen == [(False, False)]
    assert settings() == (True, True)
