"""What every low-level step shares: its arguments checked, its arrays checked and
located, a launch table of one entry, the CUDA kernels when asked for.

The arrays decide where the step runs: NumPy arrays on the CPU kernels, GPU arrays (Numba
device arrays, ``__cuda_array_interface__`` objects such as torch CUDA tensors) on the
CUDA kernels on the arrays' GPU, queued on ``stream`` (a Numba stream, a raw
``cudaStream_t`` as an int, or an object with a ``cuda_stream`` attribute such as
``torch.cuda.Stream``; by default the stream the arrays' producer names: torch's current
stream for torch tensors, the array interface's ``stream`` otherwise, else the default
stream). Nothing is written unless every array and hyperparameter passes its
check, so a rejected call leaves all arrays as they were: ``TypeError`` names an
argument of the wrong type (hyperparameters are real numbers, flags are bools),
``ValueError`` one with an invalid value, with ``torch.optim``'s messages.
"""

import numbers

import numpy as np

from . import cpu, hyperparameters
from .arrays import address_of, device_views, flat_views, is_bfloat16, locate, placement
from .precision import BFLOAT16_BITS, FLOAT16_BITS
from .tables import TensorTable


def real_numbers(**values):
    """The named hyperparameters as floats, in order (`hyperparameters.as_real`)."""
    return [hyperparameters.as_real(name, value) for name, value in values.items()]


def as_flags(**values):
    """The named flags as bools, in order (`hyperparameters.as_flag`)."""
    return [hyperparameters.as_flag(name, value) for name, value in values.items()]


def one_entry(arrays, entry_values=(), codes=False):
    """A launch table of one entry: the checked 1-D ``arrays`` (``None``: not used);
    with ``codes``, the state is block-wise 8-bit (its absmax float32)."""
    addresses = [0 if array is None else address_of(array) for array in arrays]
    param = np.dtype(arrays[0].dtype)
    if codes:
        carrier = carrier_of(param)
        formats = (carrier, carrier, np.dtype(np.float32), carrier)
        return TensorTable.single(arrays[0].size, addresses, np.float32, entry_values, formats)
    states = [np.dtype(array.dtype) for array in arrays[2:] if array is not None]
    state = states[0] if states else param
    formats = None
    if carrier_of(param) != param or state != param:
        formats = (carrier_of(param), carrier_of(param), carrier_of(state), carrier_of(param))
    return TensorTable.single(
        arrays[0].size, addresses, compute_dtype(arrays), entry_values, formats
    )


def carrier_of(dtype):
    """The type whose elements carry ``dtype``'s in the kernels (`kernels.precision`)."""
    if dtype == np.float16:
        return np.dtype(FLOAT16_BITS)
    if is_bfloat16(dtype):
        return np.dtype(BFLOAT16_BITS)
    return dtype


def compute_dtype(arrays):
    """The dtype a step computes in: 16-bit arrays in float32, each stored value rounded
    once (`kernels.precision`), as torch's fused optimizers do."""
    dtype = np.dtype(arrays[0].dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def dispatch(arrays, stream, codes=None):
    """Check ``arrays`` (``codes``: which are 8-bit state, see `arrays.flat_views`);
    return (kernel module, 1-D views, launch options) for their place."""
    if locate(arrays) == "cpu":
        if stream is not None:
            raise ValueError("stream applies to CUDA arrays; these are NumPy arrays")
        return cpu, flat_views(arrays, codes=codes), {}
    kernels = cuda_kernels()
    device, producer_stream = placement(arrays)
    views = device_views(arrays, codes=codes)
    stream = producer_stream if stream is None else as_stream(stream)
    return kernels, views, {"stream": stream, "device": device}


def cuda_kernels():
    """The CUDA kernel module, or an error that says what is missing for it."""
    try:
        from numba import cuda

        from . import cuda as kernels
    except ImportError as error:
        raise ImportError(
            "CUDA arrays need the CUDA target of Numba: pip install 'fastmomentum[cuda]' "
            f"(numba-cuda) ({error})"
        ) from error
    if not cuda.is_available():
        raise RuntimeError(
            "CUDA arrays were given but Numba finds no usable CUDA driver and GPU "
            "(numba.cuda.is_available() is False; numba.cuda.detect() says why)"
        )
    return kernels


def as_stream(stream):
    """A raw stream handle (int) or Numba stream from what the caller passed as ``stream``."""
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream and alike
        return stream.cuda_stream
    if isinstance(stream, numbers.Integral) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "synchronize"):  # a Numba stream (or the simulator's)
        return stream
    raise TypeError(
        "stream must be a Numba stream, a raw cudaStream_t (int) or an object with a "
        f"cuda_stream attribute such as torch.cuda.Stream, got {type(stream).__name__}"
    )
