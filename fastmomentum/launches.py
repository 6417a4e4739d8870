"""Before each step: where every tensor of a bucket lies now, as launch tables.

Nothing is assumed from the last step. A `StepPlanner` reads each parameter's and
gradient's address and strides every step (a few hundred nanoseconds a tensor, see
bench/NOTES.md); when a parameter moved or changed layout since the last step
(``share_memory()``, ``p.data = …``, ``p.set_``, ``Module._apply``, FSDP re-pointing a
shard) it checks that parameter again and recomputes which parameters share memory.
Then:

- a tensor laid out like its state (dense, same strides) is stepped where it lies;
- any other tensor (a strided view, a layout changed after construction, a gradient of
  another layout) is staged: copied into a scratch tensor laid out like its state,
  stepped there and, for a parameter, copied back;
- parameters that share an element are stepped in successive waves, in the order of
  the param group, which is what ``torch.optim``'s loop does to aliased parameters;
- a parameter without a gradient is left out, as in ``torch.optim``.

`StepPlanner.plan` raises before anything changes if a tensor cannot be stepped; a
`StepPlan` is carried out only after every bucket of the optimizer has been planned.
"""

import numpy as np
import torch

from fastmomentum.kernels.tables import (
    KAHAN,
    MIRRORED,
    NEAREST,
    STOCHASTIC,
    TensorTable,
    random_keys,
)

from .storage import has_internal_overlap, is_dense, share_elements, span

#: The state key of a 16-bit parameter's float32 master copy (``master_weights=True``).
MASTER = "master_param"

#: The state key of a 16-bit parameter's 16-bit compensation (``kahan_sum=True``): what
#: rounding the parameter to 16 bits lost, itself rounded; the step computes on p + c.
KAHAN_COMP = "kahan_comp"

#: The `Layout` problem of a parameter cast, moved or reshaped while it had no state.
REMAKE = "remake"

#: The `Layout` problem of a parameter cast to another dtype after its first step, its
#: state kept in the dtype it had: it steps as torch.optim's for-loop steps it
#: (`StepPlan.cast_rows`, `FlatOptimizer.step_cast`), where the optimizer can.
CAST = "cast"


class Remake(Exception):
    """Raised by `StepPlanner.plan` (before anything changed) when a parameter with a
    gradient was cast, moved or reshaped since ``bucket`` was made and has no state:
    torch.optim steps it as it now is, so its group's buckets are made again."""

    def __init__(self, bucket):
        super().__init__(bucket)
        self.bucket = bucket


class StepPlanner:
    """Plans the steps of one `bucket.ParamBucket`."""

    def __init__(self, bucket):
        self.bucket = bucket
        self._seen = None  # (addresses, strides, shapes) of the parameters when last checked
        self._layout = None  # `Layout` of the parameters as last checked
        self._tables = {}  # launch tables by (rows, columns, entry width), for this layout

    def plan(self, only=None):
        """The step of every parameter that has a gradient (of those in the rows
        ``only``, if given), or ``None`` if none has."""
        bucket = self.bucket
        tensors = bucket.local_params()
        # Address, strides and shape: a tensor re-pointed (``p.data = …``) to another of
        # another size may well land at the same address.
        seen = (
            [t.data_ptr() for t in tensors],
            [t.stride() for t in tensors],
            [t.shape for t in tensors],
        )
        changed = seen != self._seen
        layout = self._survey(tensors) if changed else self._layout
        problems = layout.problems if layout.any_problem else None
        grads = bucket.local_grads()
        if only is not None:
            grads = [grads[row] if row in only else None for row in range(len(grads))]
        rows, grads, staged_grads, cast_rows = self._read_grads(grads, problems)
        if not rows and not cast_rows:
            return None
        params = seen[0] if len(rows) == len(tensors) else [seen[0][row] for row in rows]
        if layout.any_staged:
            params = list(params)
            for position, row in enumerate(rows):
                if layout.staged[row]:
                    params[position] = tensors[row]
        staging = staged_grads or layout.any_staged
        seen = seen if changed else None
        return StepPlan(self, seen, layout, rows, params, grads, staging, cast_rows)

    def _survey(self, tensors):
        """Check every parameter's place and layout again (see the module doc).

        A parameter that cannot be stepped here (cast, moved to another device or
        reshaped after construction; elements that share memory) is a problem only at a
        step where it has a gradient, as in ``torch.optim``, which only touches those:
        without state, its group's buckets are remade; cast with its state kept in
        the bucket's dtype, it steps as torch's loop steps it (`CAST`); else an error.
        """
        bucket = self.bucket
        problems = [None] * len(tensors)
        for index, tensor in enumerate(tensors):
            expected = (bucket.dtype, bucket.device, bucket.shapes[index])
            actual = (tensor.dtype, tensor.device, tensor.shape)
            if actual == expected:
                if has_internal_overlap(tensor):
                    problems[index] = (
                        f"{bucket.names[index]} has elements that share memory (e.g. an "
                        "expanded tensor); more than one element of it refers to a single "
                        "memory location"
                    )
            elif not bucket.has_state_at(index):
                problems[index] = REMAKE  # no state to keep: its group's buckets are remade
            elif actual[1:] == expected[1:] and bucket.plain and tensor.dtype in CASTABLE:
                problems[index] = CAST
            else:
                problems[index] = (
                    f"{bucket.names[index]} changed from {bucket.dtype} "
                    f"{tuple(bucket.shapes[index])} on {bucket.device} to {tensor.dtype} "
                    f"{tuple(tensor.shape)} on {tensor.device} after the optimizer was "
                    "created; create the optimizer after moving or casting the model"
                )
        sound = [t if problem is None else t[:0] for t, problem in zip(tensors, problems)]
        staged = [not _laid_out_as(t, strides) for t, strides in zip(sound, bucket.strides)]
        return Layout(staged, waves(sound), problems)

    def _read_grads(self, grads, problems=None):
        """The parameters that have a gradient, and where each gradient is read from: an
        address, or a staged copy when it is not laid out like the parameter's state;
        and the parameters with a gradient that were cast (`CAST`). Raises for a
        gradient of a parameter with another problem (see `_survey`)."""
        bucket = self.bucket
        strides, numels, dtype = bucket.strides, bucket.numels, bucket.dtype
        device_index, strided = bucket.device_index, torch.strided
        rows, sources, staged, cast_rows = [], [], False, []
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            if problems is not None and problems[index] is not None:
                if problems[index] is REMAKE:
                    raise Remake(bucket)
                if problems[index] is CAST:
                    if grad.layout is not strided:
                        raise SparseGradient(bucket.names[index])
                    cast_rows.append(index)
                    continue
                raise RuntimeError(problems[index])
            if grad.layout is not strided:
                raise SparseGradient(bucket.names[index])
            if grad.dtype != dtype or grad.get_device() != device_index:
                raise ValueError(
                    f"{bucket.names[index]} has a gradient of {grad.dtype} on {grad.device}; "
                    f"expected {dtype} on {bucket.device}"
                )
            rows.append(index)
            if grad.stride() == strides[index] and grad.numel() == numels[index]:
                sources.append(grad.data_ptr())  # the common case: read where it lies
            elif grad.shape != bucket.shapes[index]:
                raise ValueError(
                    f"{bucket.names[index]} has a gradient of shape {tuple(grad.shape)}; "
                    f"expected {tuple(bucket.shapes[index])}"
                )
            else:
                sources.append(grad)  # e.g. a transposed or channels_last gradient
                staged = True
        return rows, sources, staged, cast_rows

    def forget_tables(self):
        """Drop the launch tables (an address they hold moved, e.g. the step counts)."""
        self._tables = {}

    def table(self, rows, columns, entry_width):
        """The launch table of parameters ``rows`` with state ``columns``."""
        every = len(rows) == len(self.bucket.params)  # the common case, keyed without rows
        key = (None if every else tuple(rows), columns, entry_width)
        table = self._tables.get(key)
        if table is None:
            bucket = self.bucket
            lengths = [bucket.numels[i] for i in rows]
            store = param_store(bucket)
            width = 2 + len(columns) + (store != NEAREST)
            table = TensorTable(lengths, width, bucket.dtype_numpy, entry_width, bucket.formats)
            for column, name in enumerate(columns, start=2):
                if name is not None:
                    table.addresses[:, column] = [bucket.state_address(name, i) for i in rows]
            table.param_store = store
            if store == MIRRORED:  # the kernel steps the master copy and rounds into the param
                table.addresses[:, 0] = [bucket.state_address(MASTER, i) for i in rows]
            elif store == KAHAN:
                table.addresses[:, -1] = [bucket.state_address(KAHAN_COMP, i) for i in rows]
            table.rows = np.array(rows, np.int64)
            table.clear_grads = bucket.clear_grads
            table.sources = None  # the (param, grad) addresses the table holds
            if len(self._tables) >= _TABLES_KEPT:  # e.g. a different set of gradients
                del self._tables[next(iter(self._tables))]  # every step (MoE): the oldest
            self._tables[key] = table
        return table


#: Launch tables a planner keeps (one per set of parameters with gradients, and per
#: state columns); beyond that the oldest is dropped and rebuilt when needed again.
_TABLES_KEPT = 8


class Layout:
    """Per parameter: whether it must be staged, its wave, and why it cannot be stepped
    (``None``: it can)."""

    def __init__(self, staged, waves, problems):
        self.staged = staged
        self.waves = waves
        self.problems = problems
        self.any_problem = any(problem is not None for problem in problems)
        self.any_staged = any(staged)
        self.simple = not self.any_staged and not any(waves)  # one launch, nothing staged


class StepPlan:
    """The launches of one step of one bucket (see `StepPlanner.plan`).

    ``rows`` are the parameters the kernels step; ``params`` and ``grads`` hold, per
    row, the address to read or (``staging``) a tensor to stage first. ``cast_rows``
    are parameters with a gradient cast after their first step (`CAST`), which
    `fastmomentum.casts` steps apart.
    """

    def __init__(self, planner, seen, layout, rows, params, grads, staging, cast_rows=()):
        self._planner, self._layout = planner, layout
        self._seen = seen  # the parameters' new (addresses, strides, shapes), or None
        self.rows, self.cast_rows = rows, cast_rows
        self._params, self._grads, self._staging = params, grads, staging

    def commit(self):
        """Take this plan's view of the parameters as the one later steps compare to."""
        if self._seen is not None:
            planner = self._planner
            planner._seen, planner._layout, planner._tables = self._seen, self._layout, {}

    def launch(self, columns, entry_width, prepare, kernel, *args):
        """Run ``kernel(table, *args)`` once per wave, in order.

        ``columns`` names the state tensors the kernel reads after param and grad
        (``None``: not read); ``prepare(table)``, if given, fills the table's entry
        values first (``table.rows`` are the wave's parameters).
        """
        self.launch_passes([(columns, entry_width, prepare, kernel, args)])

    def launch_passes(self, passes):
        """Run a step of several passes (LAMB), each ``(columns, entry_width, prepare,
        kernel, args)`` as in `launch`: every pass over one wave before the next wave,
        as torch.optim's loop steps each parameter whole before the next, and staged
        parameters copied in before a wave's first pass and out after its last."""
        if self._layout.simple and not self._staging:
            sources = (self._params, self._grads)  # often the same as last step
            self._run(passes, self.rows, self._params, self._grads, sources)
            return
        by_wave = {}
        for position, row in enumerate(self.rows):
            by_wave.setdefault(self._layout.waves[row], []).append(position)
        for wave in sorted(by_wave):
            self._launch_staged(by_wave[wave], passes)

    def _launch_staged(self, positions, passes):
        """One wave, copying staged parameters in before and out after its passes."""
        rows = tuple(self.rows[p] for p in positions)
        strides = self._planner.bucket.strides
        clear_grads = self._planner.bucket.clear_grads
        with torch.no_grad():
            params, grads, copies, cleared = [], [], [], []
            for position, row in zip(positions, rows):
                param, grad = self._params[position], self._grads[position]
                if not isinstance(param, int):
                    copy = _staged(param, strides[row])
                    copies.append((param, copy))
                    param = copy.data_ptr()
                if not isinstance(grad, int):
                    if clear_grads:  # the kernel zeroes the copy; this, the gradient
                        cleared.append(grad)
                    grad = _staged(grad, strides[row])
                    copies.append((None, grad))  # kept alive until the launch is done
                    grad = grad.data_ptr()
                params.append(param)
                grads.append(grad)
            self._run(passes, rows, params, grads, None)
            for param, copy in copies:
                if param is not None:
                    param.copy_(copy)
            for grad in cleared:
                grad.zero_()

    def _run(self, passes, rows, params, grads, sources):
        """Each pass over the parameters ``rows`` at addresses ``params`` and ``grads``.
        ``sources`` is ``(params, grads)`` when those addresses may be kept (a table
        that holds them already is not written), None when they last one launch."""
        for columns, entry_width, prepare, kernel, args in passes:
            table = self._planner.table(rows, columns, entry_width)
            if sources is None or table.sources != sources:
                table.addresses[:, _param_column(table)] = params
                table.addresses[:, 1] = grads
                table.sources = sources
            if prepare is not None:
                prepare(table)
            if table.param_store == STOCHASTIC:  # after ``prepare`` counted the step
                bucket = self._planner.bucket
                steps = bucket.step_counts[table.rows]
                keys = bucket.rounding_keys[table.rows]
                keys = random_keys(bucket.rounding_seed, keys, steps)
                if bucket.distributed:  # a shard's element i: the whole tensor's start + i
                    keys = (keys + bucket.rounding_shifts()[table.rows]) & 0xFFFFFFFF
                table.addresses[:, -1] = keys
            kernel(table, *args)


#: The dtypes a parameter may be cast to and still step on state of another dtype.
CASTABLE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class SparseGradient(RuntimeError):
    """A sparse gradient (``nn.Embedding(sparse=True)``), refused as torch's fused step
    refuses it, with what to use instead."""

    def __init__(self, name):
        super().__init__(
            f"{name} has a sparse gradient: fastmomentum, as torch.optim's fused "
            "optimizers, steps dense gradients only. Use a dense embedding "
            "(nn.Embedding(..., sparse=False)), or step that parameter with "
            "torch.optim.SGD (for-loop or foreach) or torch.optim.SparseAdam in a "
            "second optimizer"
        )


def param_store(bucket):
    """How ``bucket``'s steps store parameters (`kernels.tables`): `MIRRORED` with
    master weights, else the bucket's ``param_store`` (`KAHAN`, `STOCHASTIC`), set by
    its optimizer before its first step, or `NEAREST`."""
    if bucket.master:
        return MIRRORED
    return bucket.__dict__.get("param_store", NEAREST)


def _param_column(table):
    """Where a table holds the parameters' addresses: first, or last when the first
    column is their master copy (`kernels.tables`)."""
    return -1 if table.mirrored else 0


def _laid_out_as(tensor, strides):
    return tensor.numel() <= 1 or (tensor.stride() == strides and is_dense(tensor))


def _staged(tensor, strides):
    """A copy of ``tensor`` laid out with ``strides`` (those of the parameter's state)."""
    copy = torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


def waves(tensors):
    """The wave of each tensor: one after the latest wave of the earlier tensors it
    shares an element with (0 for all when none share memory, the common case)."""
    spans = sorted((*span(t), index) for index, t in enumerate(tensors) if t.numel())
    earlier = {}  # index -> earlier indices it shares an element with
    active = []  # (end, index) of the spans that may still reach later ones
    for start, end, index in spans:
        active = [(other_end, other) for other_end, other in active if other_end > start]
        for _, other in active:
            if share_elements(tensors[index], tensors[other]):
                first, second = sorted((index, other))
                earlier.setdefault(second, []).append(first)
        active.append((end, index))
    wave = [0] * len(tensors)
    for second in sorted(earlier):
        wave[second] = 1 + max(wave[first] for first in earlier[second])
    return wave
