"""Checks on the arrays handed to the low-level API, made before anything is written."""

import numpy as np

from .quantization import BLOCK, blocks

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: The arrays of a step that are its parameters and gradients; the others are state.
NOT_STATE = ("param", "grad")


def is_bfloat16(dtype):
    """Whether ``dtype`` is bfloat16 (NumPy has none; ml_dtypes adds one, recognised here
    by name and size, so that this module never imports it)."""
    dtype = np.dtype(dtype)
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def _supported(dtype):
    return np.dtype(dtype) in SUPPORTED_DTYPES or is_bfloat16(dtype)


def flat_views(arrays, read_only=("grad",), codes=None):
    """Check the arrays of one step and return 1-D views of them, in the order given.

    ``arrays`` maps argument names to arrays; ``None`` entries are passed through as
    ``None``. Each view is a plain ``np.ndarray`` of exactly its array's elements, since
    the kernels see only its first element's address and its length. So the arrays
    must be NumPy arrays whose elements are their memory (`_check_plain`) of one float
    dtype and one shape, C-contiguous and aligned, and no two may overlap in memory.
    Arrays not named in ``read_only`` are updated in place and must be writeable.
    ``codes`` names the arrays of block-wise 8-bit state (`_check_codes`), which have
    types and shapes of their own. Raises ``TypeError`` for the wrong kind of array or
    dtype and ``ValueError`` for the rest.
    """
    present = {name: array for name, array in arrays.items() if array is not None}
    for name, array in present.items():
        _check_plain(name, array)
    _check_dtypes_and_shapes(present, codes)
    for name, array in present.items():
        _check_layout(name, array, updated=name not in read_only)
    _check_disjoint(present)
    return [None if array is None else array.reshape(array.size) for array in arrays.values()]


def _check_plain(name, array):
    """Accept ``np.ndarray`` and ``np.memmap``, whose elements are just their memory.

    Other subclasses are refused: a masked array's mask cannot be honoured by a kernel
    that steps every element, ``np.matrix`` stays 2-D when reshaped, and what another
    subclass adds to its memory is unknown here. ``np.asarray`` gives a plain view.
    """
    if type(array) is np.ndarray or isinstance(array, np.memmap):
        return
    kind = _kind(array)
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array ({kind}); a step cannot skip masked elements: "
            f"pass np.asarray({name}) to step every element, masked ones included"
        )
    if isinstance(array, np.ndarray):
        raise TypeError(
            f"{name} is a {kind}, a subclass of np.ndarray; pass np.asarray({name}), a plain "
            "view of the same memory"
        )
    raise TypeError(f"{name} must be a NumPy array, got {kind}")


def _check_layout(name, array, updated):
    """Contiguous in C order, aligned to its dtype, and writeable if ``updated``."""
    flags = array.flags
    if not flags.c_contiguous:
        if flags.f_contiguous:
            raise ValueError(
                f"{name} is not C-contiguous but Fortran-ordered; if every array is, pass their "
                f"transposes ({name}.T is a C-contiguous view of the same memory)"
            )
        remedy = (
            "step a contiguous copy and copy it back"
            if updated
            else f"pass np.ascontiguousarray({name})"
        )
        raise ValueError(
            f"{name} is not C-contiguous (strides {array.strides}); the kernels step "
            f"contiguous memory: {remedy}"
        )
    if not flags.aligned:
        raise ValueError(f"{name} is not aligned to its {array.dtype} elements")
    if updated and not flags.writeable:
        raise ValueError(f"{name} is read-only but is updated in place")


def _check_disjoint(present):
    """No two of the (named, contiguous) arrays share a byte of memory."""
    names = list(present)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if np.may_share_memory(present[name], present[other]):
                raise ValueError(f"{name} and {other} overlap in memory")


def _kind(value):
    return f"{type(value).__module__}.{type(value).__qualname__}"


def locate(arrays):
    """``"cpu"`` if every array is a NumPy array, ``"cuda"`` if every one is on the GPU.

    GPU arrays are Numba device arrays, objects with ``__cuda_array_interface__`` (torch,
    CuPy, JAX) and, under Numba's CUDA simulator, its simulated device arrays. Raises
    ``TypeError`` for anything else and for a mix.
    """
    places = {}
    for name, array in arrays.items():
        if array is None:
            continue
        if isinstance(array, np.ndarray):
            places[name] = "cpu"
        elif cuda_array_interface(name, array) is not None or _is_simulated_device_array(array):
            places[name] = "cuda"
        elif hasattr(array, "__dlpack_device__"):
            in_host_memory = array.__dlpack_device__()[0] == 1  # kDLCPU
            hint = f"np.from_dlpack({name})" if in_host_memory else "a Numba device array"
            raise TypeError(f"{name} is a DLPack array that is not a NumPy array; pass {hint}")
        else:
            raise TypeError(f"{name} must be a NumPy array or a CUDA array, got {_kind(array)}")
    if len(set(places.values())) > 1:
        on_gpu = [name for name, place in places.items() if place == "cuda"]
        on_cpu = [name for name, place in places.items() if place == "cpu"]
        raise TypeError(f"{', '.join(on_gpu)} on the GPU but {', '.join(on_cpu)} in host memory")
    return next(iter(places.values()))


def device_views(arrays, read_only=("grad",), codes=None):
    """`flat_views` for GPU arrays: the same checks, returning 1-D Numba device arrays.

    Nothing is copied and nothing waits on the GPU (``sync=False``): the kernels are
    queued on the stream the caller names, behind the work that produced the arrays.
    """
    from numba import cuda

    present = {}
    for name, array in arrays.items():
        if array is None:
            continue
        if _is_simulated_device_array(array):
            present[name] = array
        else:
            interface = array.__cuda_array_interface__
            if name not in read_only and interface["data"][1]:
                raise ValueError(f"{name} is read-only but is updated in place")
            present[name] = cuda.as_cuda_array(array, sync=False)
    _check_dtypes_and_shapes(present, codes)
    for name, array in present.items():
        if not array.is_c_contiguous():
            raise ValueError(f"{name} is not C-contiguous")
    extents = sorted((*_device_extent(array), name) for name, array in present.items())
    for (_, end, name), (start, _, other) in zip(extents, extents[1:]):
        if start < end:
            raise ValueError(f"{name} and {other} overlap in memory")
    return [
        None if arrays[name] is None else present[name].reshape(present[name].size)
        for name in arrays
    ]


def _check_dtypes_and_shapes(present, codes=None):
    """One shape for all the (named) arrays, and one supported float dtype (float16,
    bfloat16, float32, float64), except that the state arrays may all be bfloat16 when
    the parameters are float32 (low-precision state), and that the arrays in ``codes``
    are 8-bit state (`_check_codes`)."""
    if codes:
        _check_codes(present, codes)
        present = {name: array for name, array in present.items() if name not in codes}
    (first_name, first), *others = present.items()
    if not _supported(first.dtype):
        raise TypeError(
            f"{first_name} has dtype {first.dtype}; expected float16, bfloat16 (ml_dtypes), "
            "float32 or float64"
        )
    state_dtype = None
    for name, array in others:
        if array.shape != first.shape:
            raise ValueError(f"{name} has shape {array.shape} but {first_name} has {first.shape}")
        if name in NOT_STATE or not _low_precision_state(array.dtype, first.dtype):
            if array.dtype != first.dtype:
                raise TypeError(
                    f"{name} has dtype {array.dtype} but {first_name} has {first.dtype}"
                    + ("" if name in NOT_STATE else " (state may be bfloat16 for float32)")
                )
        if name not in NOT_STATE:
            if state_dtype is not None and array.dtype != state_dtype[1]:
                raise TypeError(
                    f"{name} has dtype {array.dtype} but {state_dtype[0]} has {state_dtype[1]}"
                )
            state_dtype = state_dtype or (name, array.dtype)


#: What each kind of block-wise 8-bit state array is: its dtype, and whether it is laid
#: out like the parameter (codes) or holds one float32 per block (absmax).
CODE_KINDS = {
    "signed": (np.dtype(np.int8), True),
    "unsigned": (np.dtype(np.uint8), True),
    "absmax": (np.dtype(np.float32), False),
}


def _check_codes(present, codes):
    """The 8-bit state arrays named in ``codes`` (name -> kind of `CODE_KINDS`) against
    the first array (the parameter, float32, float16 or bfloat16)."""
    (first_name, first), *_ = present.items()
    if np.dtype(first.dtype) not in (np.float16, np.float32) and not is_bfloat16(first.dtype):
        raise TypeError(
            f"{first_name} has dtype {first.dtype}; 8-bit state is for float32, float16 and "
            "bfloat16 parameters"
        )
    for name, kind in codes.items():
        dtype, like_param = CODE_KINDS[kind]
        array = present.get(name)
        if array is None:
            raise ValueError(f"{name} is required")
        if np.dtype(array.dtype) != dtype:
            raise TypeError(f"{name} has dtype {array.dtype}; expected {dtype}")
        shape = first.shape if like_param else (blocks(first.size),)
        if tuple(array.shape) != tuple(shape):
            extra = "" if like_param else f" (one absmax per block of {BLOCK} elements)"
            raise ValueError(f"{name} has shape {array.shape}; expected {shape}{extra}")


def _low_precision_state(dtype, param_dtype):
    return is_bfloat16(dtype) and np.dtype(param_dtype) == np.float32


def cuda_array_interface(name, array):
    """``array.__cuda_array_interface__``, or None if it has none."""
    try:
        return array.__cuda_array_interface__
    except AttributeError:
        return None
    except RuntimeError as error:  # torch: a tensor that requires grad
        raise TypeError(f"{name}: {error}") from None


def placement(arrays):
    """``(device ordinal, stream handle)`` the GPU arrays' producers imply (None: unknown).

    The ordinal comes from a ``device`` attribute (torch's ``.index``, CuPy's ``.id``);
    arrays on different GPUs are an error. The stream is the one the producer says its
    data is ready on (the array interface's ``stream``) or, for torch tensors, torch's
    current stream of their device: queued there, the step follows the work that wrote
    the arrays.
    """
    ordinals, streams = set(), set()
    for name, array in arrays.items():
        if array is None or _is_simulated_device_array(array):
            continue
        device = getattr(array, "device", None)
        ordinal = getattr(device, "index", getattr(device, "id", None))
        if ordinal is not None:
            ordinals.add(ordinal)
        stream = cuda_array_interface(name, array).get("stream")
        if stream is None and type(array).__module__.startswith("torch"):
            import torch

            stream = torch.cuda.current_stream(device).cuda_stream
        if stream is not None:
            streams.add(stream)
    if len(ordinals) > 1:
        raise ValueError(f"the arrays are on different GPUs: {sorted(ordinals)}")
    ordinal = next(iter(ordinals), None)
    return ordinal, next(iter(streams)) if len(streams) == 1 else None


def address_of(array):
    """Where a NumPy or Numba device array's first element lies (for launch tables)."""
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    if _is_simulated_device_array(array):
        return array._ary.ctypes.data
    return array.device_ctypes_pointer.value or 0


def _is_simulated_device_array(array):
    return type(array).__name__ == "FakeCUDAArray"


def _device_extent(array):
    """``[start, end)`` byte addresses of a device array (empty arrays: an empty range)."""
    if _is_simulated_device_array(array):
        start = array._ary.__array_interface__["data"][0]
    else:
        start = array.__cuda_array_interface__["data"][0]
    return start, start + array.size * np.dtype(array.dtype).itemsize
