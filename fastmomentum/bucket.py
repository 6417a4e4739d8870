"""Param buckets: the parameters of one (param group, device, dtype) and our memory for them.

A bucket owns its parameters' optimizer state (one `storage.Allocation` per state name,
each parameter's state a piece of it with a storage of its own and the parameter's
layout), their step counts and (`gradients.Gradients`) their ``zero_grad``. It owns
a parameter's values only if nothing else could see them: `adopt` moves such parameters
into one allocation (each piece a storage of its own, strides kept) and leaves every
other parameter where it is. Steps never rely on either: `launches.StepPlanner` looks
where every tensor is before each step.
"""

import numpy as np
import torch

from fastmomentum.kernels import precision
from fastmomentum.kernels.tables import random_keys

from .devices import kernels_for
from .gradients import Gradients
from .launches import KAHAN_COMP, MASTER, StepPlanner
from .quantized import (
    INT8_BLOCKWISE,
    absmax_placed_like,
    absmax_shard_like,
    allocation_dtype,
    block_counts,
    is_absmax,
)
from .storage import (
    Allocation,
    dense_strides,
    is_dtensor,
    local,
    owns_storage_alone,
    placed_like,
    shard_like,
)


def _signature(tensor):
    """What tells that someone else wrote a tensor: its address and torch's version."""
    return tensor.data_ptr(), tensor._version


def compute_dtype_and_formats(dtype, state_dtype):
    """The NumPy dtype a bucket of ``dtype`` parameters and ``state_dtype`` state
    computes (and takes coefficients) in, and the element formats of its params, grads
    and state for `kernels.tables.TensorTable` (``None``: all in that dtype).

    bfloat16 and float16 compute in float32 with one rounding per stored value, as
    torch's fused optimizers do (`kernels.precision`). Block-wise 8-bit state computes
    in float32 too; its codes' types are the kernel's own, the state format given is
    that of its absmax.
    """
    if state_dtype == INT8_BLOCKWISE:
        state_dtype = torch.float32
        if dtype == torch.float32:
            return np.dtype(np.float32), (np.float32,) * 4
    if dtype not in _CARRIERS and state_dtype == dtype:
        return np.dtype(str(dtype).removeprefix("torch.")), None
    param, state = (_CARRIERS.get(d, _NUMPY.get(d)) for d in (dtype, state_dtype))
    return np.dtype(np.float32), (param, param, state, param)


_CARRIERS = {torch.bfloat16: precision.BFLOAT16_BITS, torch.float16: precision.FLOAT16_BITS}
_NUMPY = {torch.float32: np.float32}


def step_dtype():
    """The dtype of ``state["step"]``, as ``torch.optim`` picks it (non-fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def shard_rounding_shifts(params):
    """Per DTensor parameter, what its local shard adds to its random key under
    stochastic rounding (a NumPy ``int64`` array, each below 2³²).

    Element ``i`` of an entry gets the bits ``fmix32(key + i·G)`` (`precision.random_bits`,
    ``G`` = `precision.GOLDEN`, modulo 2³²), ``i`` counted in the tensor the step writes:
    for a DTensor, its local shard. When the shard is one run of consecutive elements of
    the whole (row-major) tensor, from element ``start`` on (FSDP2's ``Shard(0)``,
    uneven or not, and any placement whose shard is whole rows; ``Replicate``: start 0),
    adding ``start·G`` to the key gives its element ``i`` the bits of element
    ``start + i`` of the whole tensor: the bits of an unsharded run, whatever the number
    of ranks. Any other shard (``Shard(1)``, a strided shard, a shard that is not laid
    out row-major) cannot be written as ``start + i``; it adds a 32-bit hash of where it
    starts and of its coordinates on the mesh dimensions that shard it: bits that differ
    from shard to shard and are the same on its replicas and at a resume on the same
    mesh and placements, but are not the unsharded run's."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shifts = np.zeros(len(params), np.int64)
    for index, param in enumerate(params):
        whole = tuple(param.shape)
        shape, offset = compute_local_shape_and_global_offset(
            whole, param.device_mesh, param.placements
        )
        start, stride = 0, 1
        for size, first in zip(reversed(whole), reversed(offset)):
            start, stride = start + first * stride, stride * size
        plain = all(type(p) is Shard or not isinstance(p, Shard) for p in param.placements)
        if plain and _one_run(tuple(shape), whole) and local(param).is_contiguous():
            shifts[index] = (start * precision.GOLDEN) & 0xFFFFFFFF
        else:
            coordinate = param.device_mesh.get_coordinate() or ()
            place = 0
            for dim, placement in enumerate(param.placements):
                if isinstance(placement, Shard):
                    place = place * param.device_mesh.size(dim) + coordinate[dim]
            shifts[index] = random_keys(start, [place], [len(param.placements)])[0]
    return shifts


def _one_run(shape, whole):
    """Whether a block of ``shape`` (its offsets anywhere) in a row-major tensor of
    shape ``whole`` is one run of consecutive elements: past the first dimension it
    splits, every dimension whole; before it, one index each."""
    split = next((d for d, (a, b) in enumerate(zip(shape, whole)) if a != b), None)
    if split is None:  # the whole tensor
        return True
    return all(size == 1 for size in shape[:split]) and shape[split + 1 :] == whole[split + 1 :]


class ParamBucket:
    """Layouts, state and step counts of some parameters of one device and dtype.

    ``offsets[i]`` is where parameter ``i``'s elements start in every allocation of the
    bucket, laid out with ``strides[i]`` (its strides when the bucket was made, made
    dense). A DTensor parameter (FSDP2) is described, stepped and given state by its
    local shard; its state is exposed as DTensors placed like the parameter. Block-wise
    8-bit state (``state_dtype="int8_blockwise"``) keeps codes laid out like the
    parameters and a 1-D absmax allocation, parameter ``i``'s blocks from
    ``block_offsets[i]`` on (a DTensor's: its shard's blocks, as many as the largest
    shard has, exposed as `quantized.absmax_placed_like` says).
    """

    def __init__(
        self,
        params,
        names,
        flat_gradients=False,
        state_dtype=None,
        clear_grads=False,
        master_weights=False,
        scalars=None,
        dtype=None,
    ):
        self.params = list(params)
        self.names = list(names)  # "parameter 3 of param group 0", for error messages
        self.distributed = is_dtensor(self.params[0])
        tensors = self.local_params()
        # ``dtype``: that of the parameters' state when they were cast after their
        # first step (the state keeps it, as in torch: see `launches.CAST`)
        self.device, self.dtype = tensors[0].device, dtype or tensors[0].dtype
        self.device_index = tensors[0].get_device()  # -1 on the CPU
        self.master = master_weights  # a float32 master copy of 16-bit params (MASTER)
        self.state_dtype = torch.float32 if self.master else state_dtype or self.dtype
        self.quantized = state_dtype == INT8_BLOCKWISE  # block-wise 8-bit moments
        # state in the parameters' own dtype, no master copy (what a cast can keep)
        self.plain = state_dtype is None and not self.master
        self.dtype_numpy, self.formats = compute_dtype_and_formats(self.dtype, self.state_dtype)
        if self.master:
            self.formats = (np.float32, *self.formats[1:])
        self.master_ready = np.zeros(len(self.params), bool)  # the master copy holds p
        self._written = [None] * len(self.params)  # (address, version) our step left
        self.kernels = kernels_for(self.device)  # `kernels.cpu`, or CUDA on torch's stream
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.strides = [dense_strides(t) for t in tensors]
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)]).astype(np.int64).tolist()
        self.size = self.offsets.pop()
        dtensors = self.params if self.quantized and self.distributed else None
        self.block_counts, self.block_offsets = block_counts(self.numels, dtensors)
        self.blocks = self.block_offsets.pop()
        self._rounding_shifts = None  # see `rounding_shifts`
        self._state = {}  # state name -> Allocation
        self._steps = Allocation(len(self.params), step_dtype(), torch.device("cpu"))
        self.step_counts = self._steps.flat.numpy()  # per-parameter t, as NumPy
        self.counts_on_device = False  # see `place_scalars`
        # Per-parameter scalar state besides the step count (NAdam's mu_product), each
        # a 0-dim CPU tensor in ``state[p]`` as torch keeps it: name -> initial value.
        self.scalar_initial = {k: v for k, v in (scalars or {}).items() if k != "step"}
        self._scalars = {
            name: Allocation(len(self.params), step_dtype(), torch.device("cpu"))
            for name in self.scalar_initial
        }
        self.reset_scalars()
        self.initialized = np.zeros(len(self.params), bool)  # has optimizer state
        self.all_initialized = False
        self.settled_for = None  # see `binding.expose_new_state`
        self.exposed_kept = ()  # the state kept when ``state[p]`` entries were made
        # Optional state (Adam's ``max_exp_avg_sq``) per parameter: name -> whether each
        # parameter's state has it, and whether they all do (`holds_optional`).
        self._optional_rows = {}
        self._optional_everywhere = set()
        self.coefficients = (None, None)  # see `FlatOptimizer.cached_coefficients`
        self.clear_grads = clear_grads  # a step zeroes the gradients it reads
        self.repeats = []  # per extra listing of parameters in their group, their rows
        self.gradients = Gradients(self, flat_gradients)
        self.planner = StepPlanner(self)
        self.adopted = False  # `adopt` ran (after the bucket's first step)

    # --- where the parameters and gradients are ---------------------------------------

    def local_params(self):
        """The tensors whose memory a step updates: the parameters (DTensors: shards)."""
        if self.distributed:
            return [local(param) for param in self.params]
        return self.params

    def local_grads(self):
        """Each parameter's gradient (DTensors: its local shard, checked to be placed
        like the parameter), or ``None``."""
        grads = [param.grad for param in self.params]
        if self.distributed:
            return [None if g is None else self._local_grad(i, g) for i, g in enumerate(grads)]
        return grads

    def _local_grad(self, index, grad):
        param = self.params[index]
        if not is_dtensor(grad) or grad.placements != param.placements:
            placements = getattr(grad, "placements", "a plain tensor")
            raise ValueError(
                f"{self.names[index]} is a DTensor placed as {param.placements} but its "
                f"gradient is {placements}; fastmomentum steps a shard with the same shard "
                "of its gradient"
            )
        return local(grad)

    def changed_params(self):
        """Whether a parameter's dtype, device or shape is no longer the bucket's."""
        return any(
            (tensor.dtype, tensor.device, tensor.shape) != (self.dtype, self.device, shape)
            for tensor, shape in zip(self.local_params(), self.shapes)
        )

    def adopt(self):
        """Move the parameters whose storage is theirs alone into one allocation of ours.

        Each keeps a storage of its own (a piece of the allocation) and its strides;
        ``param.data`` is re-pointed there. Parameters that share a storage, live in
        shared memory, are pinned or are DTensors stay where they are.

        Called once, after the bucket's first step (`FlatOptimizer._step_bucket`), not
        when the bucket is made: freeing the parameters' old storages before the first
        iteration (blocks glibc mapped, up to 32 MiB) raises glibc's mmap threshold to
        the largest of them, and that iteration's activations and gradients then come
        from the heap, among the memory the first step keeps (bench/NOTES.md, entry 21).
        """
        self.adopted = True
        movable = [
            i
            for i, param in enumerate(self.params)
            if param.dtype == self.dtype and owns_storage_alone(param)
        ]
        if not movable:
            return
        values = Allocation(self.size, self.dtype, self.device)
        for index in movable:
            param = self.params[index]
            piece = values.piece(self.offsets[index], self.shapes[index], self.strides[index])
            piece.copy_(param.data)
            param.data = piece
        if self.master:  # same values: the master copies stay (see `sync_masters`)
            self.note_written([i for i in movable if self.master_ready[i]])

    def rounding_shifts(self):
        """What each DTensor parameter's shard adds to its random key under stochastic
        rounding (`shard_rounding_shifts`; made at the first step that needs it)."""
        if self._rounding_shifts is None:
            self._rounding_shifts = shard_rounding_shifts(self.params)
        return self._rounding_shifts

    # --- state ------------------------------------------------------------------------

    def state(self, name):
        """The allocation of state ``name`` (e.g. ``"exp_avg"``), zero-filled when made."""
        if name not in self._state:
            size = self.blocks if is_absmax(name) else self.size
            # a compensation is in the parameters' own format, whatever the state's
            dtype = self.dtype if name == KAHAN_COMP else allocation_dtype(name, self.state_dtype)
            self._state[name] = Allocation(size, dtype, self.device)
        return self._state[name]

    def _layout(self, name, index):
        """Where parameter ``index``'s state ``name`` starts, its shape and its strides."""
        if is_absmax(name):
            return self.block_offsets[index], (self.block_counts[index],), (1,)
        return self.offsets[index], self.shapes[index], self.strides[index]

    def has_state(self, name):
        """Whether the bucket keeps state ``name`` (made at a step that used it or a load)."""
        return name in self._state

    def state_kept(self):
        """The names of the state the bucket keeps."""
        return tuple(self._state)

    def holds_optional(self, name):
        """Per parameter, whether its state has optional state ``name`` (a bool array:
        set it to mark). A parameter gains it at a step that uses it or at a load, as
        torch's state gains ``max_exp_avg_sq`` only where AMSGrad steps it."""
        if name not in self._optional_rows:
            self._optional_rows[name] = np.zeros(len(self.params), bool)
        return self._optional_rows[name]

    def gain_optional(self, names, rows):
        """Mark optional state ``names`` present for the parameters ``rows`` (just
        stepped with it); return the rows that did not have one of them before."""
        gained = []
        rows = np.asarray(rows, np.int64)
        for name in names:
            if name in self._optional_everywhere:
                continue  # nothing to look at
            holds = self.holds_optional(name)
            gained.extend(rows[~holds[rows]].tolist())
            holds[rows] = True
            if holds.all():
                self._optional_everywhere.add(name)
        return gained

    def forget_optional(self):
        """No parameter has optional state any more (before a load binds it again)."""
        self._optional_rows.clear()
        self._optional_everywhere.clear()

    def state_address(self, name, index):
        if name == "step" or name in self._scalars:  # a capturable kernel's scalar state
            return self.scalar_address(name, index)
        return self.state(name).address_of(self._layout(name, index)[0])

    def state_piece(self, name, index):
        """Parameter ``index``'s state ``name`` as a tensor (a DTensor for a DTensor)."""
        piece = self.state(name).piece(*self._layout(name, index))
        if not self.distributed:
            return piece
        placed = absmax_placed_like if is_absmax(name) else placed_like
        return placed(piece, self.params[index])

    def count_steps(self, rows):
        """Advance the step counts of parameters ``rows``; return the common count if
        they all step and all are at the same step (the common case), else ``None``.

        Read anew each time: user code may set ``state[p]["step"]`` in place.
        """
        counts = self.step_counts
        if len(rows) != len(self.params):
            counts[rows] += 1
            return None
        counts += 1
        first = counts[0]
        return float(first) if (counts == first).all() else None

    def step_piece(self, index):
        """Parameter ``index``'s step count as torch keeps it: a 0-dim CPU tensor."""
        return self._steps.piece(index, (), ())

    def scalar_values(self, name):
        """Every parameter's scalar state ``name`` (``"step"``, ``"mu_product"``), as a
        NumPy array (writes show in ``state[p]``); with `counts_on_device`, a tensor."""
        allocation = self._steps if name == "step" else self._scalars[name]
        return allocation.flat if self.counts_on_device else allocation.flat.numpy()

    def scalar_piece(self, name, index):
        """Parameter ``index``'s scalar state ``name`` as a 0-dim tensor: on the CPU, as
        torch keeps it, or on the bucket's device with `counts_on_device`."""
        allocation = self._steps if name == "step" else self._scalars[name]
        return allocation.piece(index, (), ())

    def scalar_address(self, name, index):
        """Where parameter ``index``'s scalar state ``name`` lies (a launch table column
        of the capturable kernels, `kernels.capturable`)."""
        allocation = self._steps if name == "step" else self._scalars[name]
        return allocation.address_of(index)

    def reset_scalars(self):
        """Every scalar state back to its initial value (step counts to 0)."""
        self._steps.flat.zero_()
        for name, initial in self.scalar_initial.items():
            self._scalars[name].flat.fill_(initial)

    def place_scalars(self, on_device):
        """Keep the scalar state in CPU tensors, as ``torch.optim`` keeps it, or
        ``on_device`` (``capturable=True``: the kernels advance the step counts there and
        the host never reads them, as torch's capturable optimizers keep them). Values
        are kept; returns whether they moved (``state[p]`` must then show the new
        tensors). Launch tables that held their addresses are dropped."""
        if bool(on_device) == self.counts_on_device:
            return False
        where = self.device if on_device else torch.device("cpu")
        self._steps = _moved(self._steps, len(self.params), where)
        self._scalars = {
            name: _moved(allocation, len(self.params), where)
            for name, allocation in self._scalars.items()
        }
        self.counts_on_device = bool(on_device)
        self.step_counts = None if on_device else self._steps.flat.numpy()
        self.planner.forget_tables()
        return True

    def has_state_at(self, index):
        """Whether parameter ``index`` has state here (moments, a buffer, a master copy)."""
        return bool(self.initialized[index] or self.master_ready[index])

    def sync_masters(self, rows):
        """Copy into the master copy the parameters of ``rows`` that have none yet, or
        that someone else wrote since our last step (``model.load_state_dict``, an
        in-place edit, a new ``.data``: torch's version counter or the address moved);
        our own kernel writes bump no version."""
        tensors = self.local_params()
        for row in rows:
            tensor = tensors[row]
            if self.master_ready[row] and self._written[row] == _signature(tensor):
                continue
            with torch.no_grad():
                self.state_piece_local(MASTER, row).copy_(tensor)
            self.master_ready[row] = True

    def note_written(self, rows):
        """Remember what the parameters of ``rows`` look like after our step."""
        tensors = self.local_params()
        for row in rows:
            self._written[row] = _signature(tensors[row])

    def state_piece_local(self, name, index):
        """Parameter ``index``'s state ``name`` as a plain tensor (a DTensor's: its shard)."""
        return self.state(name).piece(*self._layout(name, index))

    def load_state_value(self, name, index, value):
        """Copy a loaded state tensor in (for a DTensor parameter: a DTensor placed like
        it, or a full tensor, of which this rank takes its shard)."""
        if self.distributed:
            shard = absmax_shard_like if is_absmax(name) else shard_like
            value = shard(value, self.params[index])
        self.state_piece_local(name, index).copy_(value)
        if name == MASTER:
            self.master_ready[index] = True
            self._written[index] = _signature(self.local_params()[index])


def _moved(allocation, size, device):
    """A copy of the scalar ``allocation`` (``size`` values) on ``device``."""
    moved = Allocation(size, allocation.flat.dtype, device)
    moved.flat.copy_(allocation.flat)
    return moved
