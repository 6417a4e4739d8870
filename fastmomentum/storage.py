"""Memory: the allocations fastmomentum owns, and questions about memory it does not.

An `Allocation` is one contiguous block carved into tensors that each have a storage of
their own, so that code which groups tensors by storage (safetensors, accelerate,
``torch.save`` of one submodule) sees every piece and only its bytes, while one kernel
pass still covers them all. Everything else here looks at tensors someone else owns:
whether a parameter's storage is its alone (`owns_storage_alone`), where a tensor's
elements are (`span`, `share_elements`), and a DTensor's local shard (`local`).
"""

import ctypes
import platform
import sys

import numpy as np
import torch

#: The NumPy type whose elements hold each torch dtype's (bfloat16: its bits, as uint16).
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,
    torch.int8: np.int8,  # block-wise 8-bit state's codes
    torch.uint8: np.uint8,
}


class Allocation:
    """``size`` elements of ``dtype`` on ``device`` in one block, zero-filled.

    `piece` makes a tensor over a sub-range with a storage object of its own (on the
    CPU ``torch.from_numpy`` of a slice, on a GPU a tensor made through the CUDA array
    interface); each piece keeps the block alive, and the block is freed when the last
    piece and `flat` are gone.
    """

    def __init__(self, size, dtype, device):
        if device.type == "cpu":
            self._array = _aligned_zeros(size, np.dtype(_NUMPY_DTYPES[dtype]))
            self.flat = torch.from_numpy(self._array).view(dtype)
        else:
            self._array = None
            self.flat = torch.zeros(size, dtype=dtype, device=device)
        self.address = self.flat.data_ptr()
        self.element_size = self.flat.element_size()

    def address_of(self, offset):
        """The address of element ``offset``."""
        return self.address + offset * self.element_size

    def piece(self, offset, shape, strides):
        """A tensor of ``shape`` and ``strides`` over the elements from ``offset`` on."""
        numel = 1
        for size in shape:
            numel *= size
        if self._array is not None:
            base = torch.from_numpy(self._array[offset : offset + numel])
        else:
            interface = _DeviceRange(self.flat, self.address_of(offset), numel)
            base = torch.as_tensor(interface, device=self.flat.device)
        return base.view(self.flat.dtype).as_strided(shape, strides)


#: Where CPU allocations start: a cache line, as torch's own CPU allocator aligns.
_ALIGNMENT = 64


def _aligned_zeros(size, dtype):
    """``np.zeros(size, dtype)`` starting on a cache line (NumPy guarantees 16 bytes)."""
    spare = _ALIGNMENT // dtype.itemsize
    block = np.zeros(size + spare, dtype)
    skip = (-block.ctypes.data % _ALIGNMENT) // dtype.itemsize
    return block[skip : skip + size]


class _DeviceRange:
    """A range of a CUDA tensor's memory behind ``__cuda_array_interface__``; torch makes
    a tensor with a storage of its own from it, which holds this object (and so the
    tensor) alive."""

    def __init__(self, owner, address, numel):
        self.owner = owner
        typestr = np.dtype(_NUMPY_DTYPES[owner.dtype]).str
        self.__cuda_array_interface__ = {
            "shape": (numel,),
            "typestr": typestr,
            "data": (address, False),
            "version": 2,  # no stream: the range is ready whenever the owner is
        }


class FirstIteration:
    """Per optimizer: once its first step has run and the gradients that step read are
    freed (``zero_grad()``, or a step in backward freeing them), the C heap's free
    pages go back to the system, once (`release_free_heap`), if its CPU parameters
    hold `RELEASE_FROM` bytes or more (below that the heap is not worth a look).

    Why (bench/NOTES.md, entry 21): that first step makes memory that lasts (compiled
    kernels loaded, state and its views; in backward, every bucket's state while all
    gradients of the learning backward are alive), and glibc places it among the
    blocks the iteration's activations and gradients held. Freed, those blocks stay
    resident, too scattered for the next iteration's gradients, and the heap grows
    past them: 0.6 to 5 bytes a parameter at the peak that torch.optim does not pay.
    """

    RELEASE_FROM = 64 * 2**20

    def __init__(self, params):
        size = sum(p.numel() * p.element_size() for p in params if p.device.type == "cpu")
        self.stepped, self.done = False, size < self.RELEASE_FROM

    def gradients_freed(self):
        if self.stepped and not self.done:
            self.done = True
            release_free_heap()


def release_free_heap():
    """Give every free page of the C heap back to the system: glibc's ``malloc_trim(0)``
    (all arenas, wherever in them the pages lie; 0.27 s for a 400 MB heap on a loaded
    2-core machine), nothing elsewhere."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if platform.libc_ver()[0] == "glibc":
            try:
                _LIBC = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None  # glibc, once looked for (False: not there)


def dense_strides(tensor):
    """Strides of a dense tensor laid out like ``tensor`` (``preserve_format``)."""
    return torch.empty_like(tensor, device="meta", memory_format=torch.preserve_format).stride()


def is_dense(tensor):
    """Whether ``tensor``'s elements fill a block of memory with no gaps and no repeats."""
    return torch.ops.aten.is_non_overlapping_and_dense(tensor)


def has_internal_overlap(tensor):
    """Whether two of ``tensor``'s elements are the same memory (e.g. a stride of 0)."""
    return torch._debug_has_internal_overlap(tensor) == 1  # 1: yes; 0: no; 2: too hard


def _use_count(tensor):
    """How many references the storage has (torch's own count; without that private
    function, a count no parameter passes: nothing is adopted, everything is stepped
    where it lies)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(tensor.untyped_storage()._cdata) if count else 1 << 30


#: What `_use_count` reads for a tensor alone on its storage (the tensor and the
#: storage object `untyped_storage` returns).
_ALONE = _use_count(torch.empty(1)) if hasattr(torch._C, "_storage_Use_Count") else 0


def owns_storage_alone(tensor):
    """Whether nothing but ``tensor`` can see its memory: it covers its whole storage,
    torch allocated that storage (not NumPy, DLPack or a ``multiprocessing`` array: their
    owners see the memory too), no other tensor holds it, and it is not shared with other
    processes or pinned. Moving such a tensor's values elsewhere is invisible to
    everyone else."""
    if is_dtensor(tensor) or not is_dense(tensor) or tensor.storage_offset() != 0:
        return False
    storage = tensor.untyped_storage()
    if not storage.resizable():  # memory torch did not allocate (or our own pieces)
        return False
    if storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    if tensor.is_shared() or _pinned(tensor):
        return False
    return _use_count(tensor) <= _ALONE


def _pinned(tensor):
    """Whether a CPU tensor is in page-locked memory (asked only once CUDA is up: only
    CUDA can pin, and asking would otherwise start a CUDA context)."""
    return tensor.device.type == "cpu" and torch.cuda.is_initialized() and tensor.is_pinned()


def span(tensor):
    """``(first byte, end byte)`` of the memory ``tensor``'s elements lie in."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()  # torch has no negative strides


def share_elements(first, second):
    """Whether two tensors on one device have an element in common (exactly: two
    interleaved views, such as the even and odd columns of one matrix, do not)."""
    (start, end), (other_start, other_end) = span(first), span(second)
    if end <= other_start or other_end <= start:
        return False
    if is_dense(first) and is_dense(second):
        return True
    return bool(np.shares_memory(_address_layout(first), _address_layout(second)))


def _address_layout(tensor):
    """A NumPy array with ``tensor``'s addresses and strides, for arithmetic on where its
    elements lie; its memory is never read (it may be a GPU's)."""
    size = tensor.element_size()

    class Layout:
        __array_interface__ = {
            "shape": tuple(tensor.shape),
            "typestr": f"|V{size}",
            "data": (tensor.data_ptr(), True),
            "strides": tuple(stride * size for stride in tensor.stride()),
            "version": 3,
        }

    return np.asarray(Layout())


def is_dtensor(tensor):
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor):
    """The tensor whose memory a step writes: a DTensor's local shard, else itself."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():  # the shard itself, not an autograd view of it
        return tensor.to_local()


def placed_like(shard, param):
    """``shard`` (this rank's part of something shaped like the DTensor ``param``) as a
    DTensor placed like ``param``; no communication."""
    return type(param).from_local(
        shard,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def shard_like(value, param):
    """This rank's shard of ``value``, shaped like the DTensor ``param``: a DTensor's
    local shard, or the slice of a full tensor that ``param``'s placements give this
    rank (no communication)."""
    if is_dtensor(value):
        return local(value)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return value[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
