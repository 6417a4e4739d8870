"""Zero-copy views of torch tensors as the arrays the kernels take.

CPU tensors become NumPy arrays through DLPack; CUDA tensors become Numba device arrays
through the CUDA array interface, without synchronising: kernels are queued on torch's
current stream, behind the work that wrote the tensors.
"""

import numpy as np


def as_array(tensor):
    """A NumPy array (CPU) or Numba device array (CUDA) sharing ``tensor``'s memory."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return np.from_dlpack(tensor)
    if tensor.device.type == "cuda":
        from numba import cuda

        with cuda.gpus[tensor.device.index]:  # no context on another device
            return cuda.as_cuda_array(tensor, sync=False)
    raise ValueError(f"expected a CPU or CUDA tensor, got one on {tensor.device}")


def memory_order_array(tensor):
    """A 1-D array over a dense ``tensor``'s memory, in memory order (not index order).

    A parameter's flat range and a gradient with the parameter's strides line up this
    way. Contiguous CPU tensors take ``Tensor.numpy`` (≈1.3 µs against ≈4 µs through
    DLPack, once per gradient per step on the ``set_to_none=True`` path).
    """
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        return tensor.numpy().reshape(-1)
    return as_array(tensor.as_strided((tensor.numel(),), (1,)))
