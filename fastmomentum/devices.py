"""Which kernels a bucket launches: CPU loops, or CUDA kernels on torch's stream."""

import numpy as np
import torch

from fastmomentum.kernels import config, cpu
from fastmomentum.kernels.calls import cuda_kernels


def capturing(device):
    """Whether a CUDA graph is being captured on torch's current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cuda_unavailable_reason():
    """``None`` if the CUDA kernels can run here, else why not (for error messages)."""
    try:
        cuda_kernels()
    except (ImportError, RuntimeError) as error:
        return str(error)
    return None


def steps_on_gpu(device):
    """Whether a bucket on ``device`` launches the CUDA kernels (`kernels_for`)."""
    return device.type != "cpu" or config.FORCE_CUDA


def kernels_for(device):
    """The kernels for a bucket on ``device`` (``config.FORCE_CUDA``: CUDA for CPU too)."""
    return TorchStreamKernels(device) if steps_on_gpu(device) else cpu


def kernel_array(tensor):
    """``tensor`` as a CUDA kernel takes it, its memory neither copied nor waited for:
    a Numba view of it, or in the simulator (a CPU tensor) a NumPy one."""
    if tensor.device.type != "cuda":
        return np.from_dlpack(tensor)
    from numba import cuda

    return cuda.as_cuda_array(tensor, sync=False)


class TorchStreamKernels:
    """The CUDA kernels with the CPU kernels' signatures, launched on torch's current
    stream of the bucket's device, so they run in order with torch's own work and the
    host never waits for them (GradScaler's ``found_inf`` aside, read on the host unless
    ``capturable=True``: `fastmomentum.capture`). A launch table's arrays
    reach the GPU as torch tensors, allocated and first filled on that stream and kept
    with the table (`kernels.cuda`: refilled in place when they change), so torch's
    allocator reuses their memory only once the table is dropped, in that stream's
    order."""

    def __init__(self, device):
        self.device = device
        self._cuda = cuda_kernels()

    def launch(self, table, spec, coefficients, flags=(), live=None, **sums):
        """``kernels.cuda.launch``; ``sums``: its ``keep_sums`` and ``sums`` (LAMB's norms
        kept on the GPU, `kernels.sums`)."""
        placement = self._placement()
        if live is not None:  # a capturable step (`fastmomentum.capture`)
            placement.update(live=live, capturing=capturing(self.device))
        return self._cuda.launch(table, spec, coefficients, flags, **placement, **sums)

    def _placement(self):
        if self.device.type != "cuda":  # FORCE_CUDA on CPU tensors (the simulator)
            return {}
        stream = torch.cuda.current_stream(self.device).cuda_stream
        return {"stream": stream, "device": self.device.index, "upload": self._upload}

    def _upload(self, array):
        source = torch.from_numpy(array)
        if capturing(self.device):  # a graph captures a copy from pinned memory only, and
            source = source.pin_memory()  # replays it: the source lives with the array
        on_device = kernel_array(source.to(self.device, non_blocking=True))
        on_device.source = source
        return on_device
