"""Checks on the arrays handed to the low-level API, made before anything is written."""

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def flat_views(arrays, read_only=("grad",)):
    """Check the arrays of one step and return 1-D views of them, in the order given.

    ``arrays`` maps argument names to arrays; ``None`` entries are passed through as
    ``None``. Arrays not named in ``read_only`` are updated in place and must be
    writeable. All must be NumPy arrays of one float dtype and one shape, C-contiguous,
    and no two may overlap in memory. Raises ``TypeError`` for the wrong kind of array
    or dtype and ``ValueError`` for the rest.
    """
    present = {name: array for name, array in arrays.items() if array is not None}
    for name, array in present.items():
        if not isinstance(array, np.ndarray):
            kind = f"{type(array).__module__}.{type(array).__qualname__}"
            raise TypeError(f"{name} must be a NumPy array, got {kind}")
    _check_dtypes_and_shapes(present)
    for name, array in present.items():
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")
        if name not in read_only and not array.flags.writeable:
            raise ValueError(f"{name} is read-only but is updated in place")
    names = list(present)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if np.may_share_memory(present[name], present[other]):
                raise ValueError(f"{name} and {other} overlap in memory")
    return [None if array is None else array.reshape(-1) for array in arrays.values()]


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
            kind = f"{type(array).__module__}.{type(array).__qualname__}"
            raise TypeError(f"{name} must be a NumPy array or a CUDA array, got {kind}")
    if len(set(places.values())) > 1:
        on_gpu = [name for name, place in places.items() if place == "cuda"]
        on_cpu = [name for name, place in places.items() if place == "cpu"]
        raise TypeError(f"{', '.join(on_gpu)} on the GPU but {', '.join(on_cpu)} in host memory")
    return next(iter(places.values()))


def device_views(arrays, read_only=("grad",)):
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
    _check_dtypes_and_shapes(present)
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


def _check_dtypes_and_shapes(present):
    """One supported float dtype and one shape for all the (named) arrays."""
    (first_name, first), *others = present.items()
    if np.dtype(first.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} has dtype {first.dtype}; expected float32 or float64")
    for name, array in others:
        if array.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but {first_name} has {first.dtype}")
        if array.shape != first.shape:
            raise ValueError(f"{name} has shape {array.shape} but {first_name} has {first.shape}")


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
