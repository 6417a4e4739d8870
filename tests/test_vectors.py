"""Vector loads (`kernels.vectors`): the compiled intrinsic against element-by-element
loads, and the CUDA kernels' two paths (vector loads where a segment's arrays are
aligned, scalar loads elsewhere) against the CPU loops, bit for bit, in the simulator.
"""

import numpy as np
import pytest
from numba import config as numba_config
from numba import njit

from fastmomentum.kernels import config, cpu, rules
from fastmomentum.kernels.pointers import pointer_to
from fastmomentum.kernels.precision import (
    BFLOAT16_BITS,
    FLOAT16_BITS,
    load,
    random_bits,
    stochastic_bits,
    store,
    store_stochastically,
)
from fastmomentum.kernels.tables import KAHAN, MIRRORED, NEAREST, STOCHASTIC, TensorTable
from fastmomentum.kernels.vectors import (
    added,
    by_element,
    vector_aligned,
    vector_load,
    vector_store,
    vector_store_bits,
)

#: Element formats (as the kernels carry them) and the vector lengths of at most 16 bytes.
CARRIERS = {
    "float32": (np.float32, (2, 4)),
    "float64": (np.float64, (2,)),
    "bfloat16": (BFLOAT16_BITS, (2, 4, 8)),
    "float16": (FLOAT16_BITS, (2, 4, 8)),
}


def carried(values, carrier):
    """``values`` (float32) in ``carrier``'s format: 16-bit floats as their bits."""
    if carrier == BFLOAT16_BITS:  # truncated: any bfloat16 value will do
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if carrier == FLOAT16_BITS:
        return values.astype(np.float16).view(np.int16)
    return values.astype(carrier)


def aligned_buffer(values, alignment=64):
    """A copy of ``values`` whose first element is at an address divisible by ``alignment``."""
    raw = np.zeros(values.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    copy = raw[start : start + values.nbytes].view(values.dtype)
    copy[...] = values
    return copy


def nonzero_random(size, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size).astype(np.float32)
    return np.where(np.abs(values) < 1e-3, np.float32(1.5), values)


@njit
def _vector_loads(address, like, fours_fit, eights_fit):
    """The vectors of 2, 4 (where ``fours_fit``) and 8 elements (``eights_fit``: in 16
    bytes) that cover the 16 elements at ``address``, compiled."""
    pointer = pointer_to(address, like)
    twos = [vector_load(pointer, i, 2) for i in range(0, 16, 2)]
    fours = [vector_load(pointer, i, 4) for i in range(0, 16 * fours_fit, 4)]
    eights = [vector_load(pointer, i, 8) for i in range(0, 16 * eights_fit, 8)]
    return twos, fours, eights


@njit
def _scalar_loads(address, like):
    pointer = pointer_to(address, like)
    return [load(pointer, i, like) for i in range(16)]


@pytest.mark.parametrize("name", list(CARRIERS))
def test_compiled_vector_load_is_each_element_loaded(name):
    """On the CPU (njit), from a 64-byte aligned buffer at every aligned start index,
    each vector (2, 4 and 8 elements where they fit in 16 bytes) holds the elements
    that `precision.load` reads one by one, compiled and in Python, bit for bit."""
    carrier, counts = CARRIERS[name]
    array = aligned_buffer(carried(nonzero_random(16, 1), carrier))
    like = array.dtype.type(0)
    twos, fours, eights = _vector_loads(array.ctypes.data, like, 4 in counts, 8 in counts)
    expected = _scalar_loads(array.ctypes.data, like)
    assert [load(array, i, like) for i in range(16)] == expected
    for count, vectors in ((2, twos), (4, fours), (8, eights)):
        if count not in counts:
            continue
        flat = np.array([value for vector in vectors for value in vector])
        assert len(flat) == 16
        np.testing.assert_array_equal(
            flat.view(f"u{flat.itemsize}"), np.array(expected).view(f"u{flat.itemsize}")
        )
        python = [vector_load(array, i, count) for i in range(0, 16, count)]
        assert [tuple(map(float, v)) for v in python] == [tuple(v) for v in vectors]


@njit
def _vector_stores(address, like, values, count):
    """``values`` stored at ``address`` by vectors of ``count`` (2, 4 or 8), compiled."""
    pointer = pointer_to(address, like)
    for i in range(0, len(values), count):
        if count == 2:
            vector_store(pointer, i, (values[i], values[i + 1]))
        elif count == 4:
            vector_store(pointer, i, (values[i], values[i + 1], values[i + 2], values[i + 3]))
        else:
            a, b, c, d, e, f, g, h = values[i : i + 8]
            vector_store(pointer, i, (a, b, c, d, e, f, g, h))


@njit
def _scalar_stores(address, like, values):
    pointer = pointer_to(address, like)
    for i in range(len(values)):
        store(pointer, i, values[i])


@pytest.mark.parametrize("name", list(CARRIERS))
def test_compiled_vector_store_is_each_element_stored(name):
    """On the CPU (njit), into a 64-byte aligned buffer, vectors of 2, 4 and 8 elements
    (where they fit in 16 bytes) store the bits `precision.store` stores one by one,
    compiled and in Python: values that round (16-bit formats: ties too), ±0, ±inf,
    NaN and float16's overflow."""
    carrier, counts = CARRIERS[name]
    compute = np.float64 if carrier == np.float64 else np.float32
    values = (nonzero_random(64, 3) * np.float32(3.1)).astype(compute)
    values[:8] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e5, 1 + 2.0**-8, 1 + 3 * 2.0**-8]
    expected = aligned_buffer(np.zeros(64, carrier))
    _scalar_stores(expected.ctypes.data, carrier(0), values)
    python = aligned_buffer(np.zeros(64, carrier))
    for i in range(0, 64, 2):
        vector_store(python, i, (values[i], values[i + 1]))
    bits = f"u{expected.itemsize}"
    np.testing.assert_array_equal(python.view(bits), expected.view(bits))
    assert len(set(expected.view(bits))) > 50  # every store landed, none alike
    for count in counts:
        stored = aligned_buffer(np.full(64, 7, carrier))
        _vector_stores(stored.ctypes.data, carrier(0), values, count)
        np.testing.assert_array_equal(stored.view(bits), expected.view(bits), f"by {count}")


@njit
def _stochastic_stores(address, like, values, key, by_vector):
    """``values`` rounded stochastically under ``key`` into ``address``, by vectors of 2
    (`precision.stochastic_bits`, `vector_store_bits`) or one by one, compiled."""
    pointer = pointer_to(address, like)
    for i in range(0, len(values), 2):
        if by_vector:
            first = stochastic_bits(pointer, values[i], random_bits(key, i))
            second = stochastic_bits(pointer, values[i + 1], random_bits(key, i + 1))
            vector_store_bits(pointer, i, (first, second))
        else:
            store_stochastically(pointer, i, values[i], random_bits(key, i))
            store_stochastically(pointer, i + 1, values[i + 1], random_bits(key, i + 1))


@pytest.mark.parametrize("name", list(CARRIERS))
def test_compiled_stochastic_vector_store_is_each_element_stored(name):
    """`vector_store_bits` of `stochastic_bits` stores what `store_stochastically` stores
    element by element (compiled and in Python), the same random bits per element."""
    carrier, _ = CARRIERS[name]
    compute = np.float64 if carrier == np.float64 else np.float32
    values = (nonzero_random(64, 4) * np.float32(3.1)).astype(compute)
    values[:4] = [np.nan, np.inf, -0.0, 1e5]
    stored = [aligned_buffer(np.zeros(64, carrier)) for _ in range(2)]
    for buffer, by_vector in zip(stored, (True, False)):
        _stochastic_stores(buffer.ctypes.data, carrier(0), values, 77, by_vector)
    python = aligned_buffer(np.zeros(64, carrier))
    for i in range(0, 64, 2):
        bits = [stochastic_bits(python, values[i + k], random_bits(77, i + k)) for k in (0, 1)]
        vector_store_bits(python, i, tuple(bits))
    view = f"u{python.itemsize}"
    np.testing.assert_array_equal(stored[0].view(view), stored[1].view(view))
    np.testing.assert_array_equal(python.view(view), stored[1].view(view))


@njit
def _pairs(address, like, i):
    pointer = pointer_to(address, like)
    first, second = vector_load(pointer, i, 4), vector_load(pointer, i + 4, 4)
    return added(first, second), by_element((first, second)), vector_aligned(address, i, 4, pointer)


def test_added_by_element_and_alignment_compiled_as_in_python():
    array = aligned_buffer(nonzero_random(16, 2))
    like = np.float32(0)
    for i in (0, 4, 8):
        sums, members, aligned = _pairs(array.ctypes.data, like, i)
        first, second = vector_load(array, i, 4), vector_load(array, i + 4, 4)
        assert sums == tuple(map(float, added(first, second)))
        assert members == tuple(tuple(map(float, m)) for m in by_element((first, second)))
        assert aligned and vector_aligned(array.ctypes.data, i, 4, array)
    assert members[1] == (float(first[1]), float(second[1]))
    assert not vector_aligned(array.ctypes.data, 1, 4, array)  # 4 bytes past 16
    assert not vector_aligned(array.ctypes.data + 8, 0, 4, array)
    assert vector_aligned(array.ctypes.data + 8, 2, 4, array)
    assert vector_aligned(0, 0, 8, array)  # an array not used


# --- the CUDA kernels in the simulator ------------------------------------------------

F32, F64, BF16, FP16 = np.float32, np.float64, BFLOAT16_BITS, FLOAT16_BITS
#: Launch tables' formats: compute dtype, (param, grad, state, companion), param store.
TABLE_FORMATS = {
    "fp32": (F32, (F32, F32, F32, F32), NEAREST),
    "fp64": (F64, (F64, F64, F64, F64), NEAREST),
    "bf16": (F32, (BF16, BF16, BF16, BF16), NEAREST),
    "fp16, kahan": (F32, (FP16, FP16, FP16, FP16), KAHAN),
    "bf16, master": (F32, (F32, BF16, F32, BF16), MIRRORED),  # grad vectors of 8 bytes
    "bf16, stochastic": (F32, (BF16, BF16, BF16, BF16), STOCHASTIC),  # the key: an address
}
#: Adam's entries: a length, and where each array starts past a 64-byte boundary, in
#: elements (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, companion); 8 elements
#: of any format are a multiple of 16 bytes.
ENTRIES = [
    (300, (0, 0, 0, 0, 0, 0)),  # aligned
    (201, (1, 1, 1, 1, 1, 1)),  # at odd offsets
    (150, (8, 1, 8, 8, 8, 8)),  # the gradient alone at an odd offset
    (77, (0, 0, 0, 0, 3, 0)),  # max_exp_avg_sq alone: aligned without amsgrad
    (130, (8, 8, 8, 8, 8, 1)),  # the companion alone: aligned unless it is loaded (Kahan)
]


def _expected_vector_entries(amsgrad, param_store):
    """The entries of `ENTRIES` whose every array loaded or stored is aligned."""
    vector = {0, 4} if param_store not in (KAHAN, MIRRORED) else {0}
    return vector | ({3} if not amsgrad else set())


def _adam_table(formats, param_store, seed):
    """A table of `ENTRIES` over fresh arrays (each in its own 64-byte aligned buffer, at
    its offset), and the arrays, from the same random values for the same ``seed``."""
    compute, (param, grad, state, companion), _ = formats
    columns = [param, grad, state, state, state] + ([companion] if param_store else [])
    table = TensorTable(
        [n for n, _ in ENTRIES], len(columns), compute, 2, (param, grad, state, companion)
    )
    table.param_store = param_store
    arrays = []
    for entry, (length, offsets) in enumerate(ENTRIES):
        values = [nonzero_random(length, seed + 7 * entry + column) for column in range(6)]
        values[3], values[4] = np.abs(values[3]), np.abs(values[4])  # second moments
        values[5] *= np.float32(1e-3)  # a Kahan compensation (mirrored: overwritten)
        for column, carrier in enumerate(columns):
            buffer = aligned_buffer(
                carried(np.r_[np.ones(offsets[column], F32), values[column]], carrier)
            )
            arrays.append(buffer)
            table.addresses[entry, column] = buffer[offsets[column] :].ctypes.data
        if param_store == STOCHASTIC:  # the last column: a random key, the same in both
            table.addresses[entry, -1] = 0x5EED + entry
    return table, arrays


@pytest.mark.cudasim
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("name", list(TABLE_FORMATS))
def test_aligned_segments_take_vector_loads_and_step_as_the_cpu(name, amsgrad, monkeypatch):
    """Adam over a table whose entries are aligned, at odd offsets, or aligned but for
    one array: the entries every array of which is aligned where loaded or stored take
    the vector path (vector loads and stores), the others today's scalar one (which
    entries: counted at the kernel's vector loads), and both give the CPU loop's bits
    in every array, over two steps, the second clearing the gradients."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    if not numba_config.ENABLE_CUDASIM:  # host arrays, the kernel's Python run
        pytest.skip("runs the kernels in Numba's CUDA simulator")
    from fastmomentum.kernels import cuda as kernels

    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(config, "multiprocessors", lambda: 2)
    formats = TABLE_FORMATS[name]
    compute, param_store = formats[0], formats[2]
    spec = rules.adam.SPEC
    namespace = kernels.kernel(spec, (amsgrad,)).py_func.__globals__
    vector_loads, vector_params = namespace["VECTOR_LOADS"], set()

    def counted(i, count, param, *rest):
        vector_params.add(param.ctypes.data)
        return vector_loads(i, count, param, *rest)

    monkeypatch.setitem(namespace, "VECTOR_LOADS", counted)
    on_cpu, on_cpu_arrays = _adam_table(formats, param_store, seed=5)
    on_gpu, on_gpu_arrays = _adam_table(formats, param_store, seed=5)
    coefficients = rules.adam.coefficients(compute, 1e-2, (0.9, 0.999), 1e-8, 0.1, False, False)
    for step in (1, 2):
        for table, launch in ((on_cpu, cpu.launch), (on_gpu, kernels.launch)):
            table.entry_values[:] = rules.adam.step_coefficients(compute, step, 1e-2, (0.9, 0.999))
            table.clear_grads = step == 2
            launch(table, spec, coefficients, (amsgrad,))
    for k, (a, b) in enumerate(zip(on_cpu_arrays, on_gpu_arrays)):
        np.testing.assert_array_equal(
            b.view(f"u{b.itemsize}"), a.view(f"u{a.itemsize}"), f"array {k}"
        )
    columns = len(on_gpu_arrays) // len(ENTRIES)
    for entry, (_, offsets) in enumerate(ENTRIES):  # each gradient cleared, past its offset
        assert not on_gpu_arrays[entry * columns + 1][offsets[1] :].any(), f"entry {entry}"
    took = {e for e in range(len(ENTRIES)) if on_gpu.addresses[e, 0] in vector_params}
    assert took == _expected_vector_entries(amsgrad, param_store)
