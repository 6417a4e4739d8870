"""Comparisons that say which elements differ, NaN and inf included."""

import numpy as np
import pytest
import torch

#: Relative tolerances (max |a − b| / max |b| per tensor), per dtype. Measured: float64
#: parity stays ≈1e-14 after 200 steps, float32 ≈3e-6 (rounding of single ops, fused or
#: not, grows through the model's feedback); the bounds leave room for that and no more.
RTOL = {"float64": 1e-12, "float32": 1e-5}


def assert_relative_close(actual, expected, rtol, name="value"):
    """Fail unless ``max|actual − expected| ≤ rtol · max|expected|``, NaN/inf placed alike."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    infinite = np.isinf(actual) | np.isinf(expected)
    misplaced = (np.isnan(actual) != np.isnan(expected)) | (infinite & (actual != expected))
    if misplaced.any():
        where = np.argwhere(misplaced)[:5].tolist()
        raise AssertionError(
            f"{name}: NaN/inf differ at {where}: "
            f"{actual[misplaced][:5]} vs {expected[misplaced][:5]}"
        )
    finite = np.isfinite(actual) & np.isfinite(expected)
    a, e = actual[finite], expected[finite]
    scale = max(np.abs(e).max(initial=0.0), np.finfo(np.float64).tiny)
    error = np.abs(a - e)
    if error.max(initial=0.0) > rtol * scale:
        worst = np.argsort(error)[::-1][:5]
        raise AssertionError(
            f"{name}: relative error {error.max() / scale:.3e} > {rtol:.1e} "
            f"({int((error > rtol * scale).sum())} of {a.size} elements); worst (flat index, "
            f"actual, expected): {[(int(i), a[i], e[i]) for i in worst]}"
        )


def join_within(process, deadline, what):
    """Wait up to ``deadline`` seconds for a started ``multiprocessing`` process; one
    still running then is killed and the test fails saying so; one that failed fails
    the test with its exit code."""
    process.join(timeout=deadline)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"{what} was still running after {deadline} s (hung?): killed")
    assert process.exitcode == 0, f"{what} exited with {process.exitcode}"


#: Param-group keys that are implementation switches, not hyperparameters.
IMPLEMENTATION_KEYS = {"foreach", "fused", "momentum_convention"}


def assert_same_training(ours, theirs, dtype, factor=1.0):
    """Parameters and the whole state dicts of two (model, optimizer) pairs agree, within
    `RTOL` (times ``factor``, for rules that round more often per step)."""
    tolerance = RTOL[str(dtype).removeprefix("torch.")] * factor
    (model, optimizer), (ref_model, ref_optimizer) = ours, theirs
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.dtype == q.dtype
        assert_relative_close(p.detach(), q.detach(), tolerance, name)
    state, ref_state = optimizer.state_dict(), ref_optimizer.state_dict()
    assert state["state"].keys() == ref_state["state"].keys()
    for index, entry in ref_state["state"].items():
        assert state["state"][index].keys() == entry.keys(), f"state keys of parameter {index}"
        for key, value in entry.items():
            mine = state["state"][index][key]
            if key == "step":
                assert mine.dtype == value.dtype and float(mine) == float(value)
            else:
                assert mine.stride() == value.stride(), f"{key} of parameter {index}: layout"
                assert_relative_close(mine, value, tolerance, f"state {index} {key}")
    for group, ref_group in zip(state["param_groups"], ref_state["param_groups"]):
        for key in ref_group.keys() - IMPLEMENTATION_KEYS:
            mine, theirs = group[key], ref_group[key]
            if torch.is_tensor(theirs):  # a tensor hyperparameter
                mine, theirs = float(mine), float(theirs)
            assert mine == pytest.approx(theirs, rel=1e-15), key


#: The ``Tensor`` methods that read a tensor's value on the host.
HOST_READS = ("item", "__float__", "__bool__", "tolist", "cpu", "numpy")


def refuse_host_reads(monkeypatch):
    """Make every `HOST_READS` method of ``torch.Tensor`` raise, until
    ``monkeypatch.undo()``: a step that reads a tensor on the host then fails."""

    def refused(method):
        def read(*args, **kwargs):
            raise AssertionError(f"the step read a tensor on the host (Tensor.{method})")

        return read

    for method in HOST_READS:
        monkeypatch.setattr(torch.Tensor, method, refused(method))
