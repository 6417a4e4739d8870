"""Comparisons that say which elements differ, NaN and inf included."""

import numpy as np

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
