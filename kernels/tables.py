"""Launch tables: the memory one multi-tensor kernel launch steps, wherever it lies.

Entry ``e`` of a `TensorTable` is one tensor of ``lengths[e]`` elements; for every array
its rule reads or writes (param, grad, then the rule's state arrays, in the rule's
order) ``addresses[e, j]`` is where that tensor's elements start. The arrays of an entry
are laid out alike: element ``k`` of each belongs to the same parameter element.
``entry_values[e]`` holds coefficients of that entry alone (e.g. its bias corrections
at its own step count); the coefficients all entries share are passed to the launch.
``formats`` gives the element type of the params, the grads, the state arrays and the
companion (one zero scalar each): the compute ``dtype`` by default, or the 16-bit
carriers of `kernels.precision` for bfloat16 and float16 arrays. ``param_store`` says
how each new param value is stored; all but `NEAREST` add one column, last, the
entry's *companion*:

- `NEAREST`: rounded to the param's format, to nearest (no companion);
- `MIRRORED`: the param column is a float32 master copy; each new value is also stored,
  rounded, at the companion's address (the 16-bit parameter: master weights);
- `KAHAN`: the companion is the address of a compensation array of the param's
  format: the step computes on ``p + c`` and stores ``p = round(y)``,
  ``c = round(y − p)`` (Kahan-compensated summation);
- `STOCHASTIC`: the companion is not an address but the entry's random key (a
  non-negative integer below 2³²), from which each element's random bits are drawn
  (`kernels.precision.random_bits`); the new value is rounded stochastically.

Work is split by elements, not by tensor, into segments ``(entry, begin, end)``:

- CPU (`cpu_schedule`): the table's elements are cut into one equal range per thread,
  and each range lists the segments of the entries it covers;
- CUDA (`cuda_segments`): segments of at most ``chunk`` elements, one block each (with
  the count of its entry's segments and the index of the first).

So one huge tensor and many tiny ones both keep every thread busy. Schedules depend on
the lengths only and are kept; addresses and entry values may change before each launch.
"""

import functools

import numpy as np

#: How a step stores each new parameter value (`TensorTable.param_store`, see above).
NEAREST, MIRRORED, KAHAN, STOCHASTIC = 0, 1, 2, 3


class TensorTable:
    """The entries of one launch: ``width`` addresses each, ``entry_width`` own values."""

    def __init__(self, lengths, width, dtype, entry_width=0, formats=None):
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if (self.lengths < 0).any():
            raise ValueError("table lengths must be non-negative")
        self.starts = np.zeros(self.lengths.size + 1, np.int64)
        np.cumsum(self.lengths, out=self.starts[1:])
        self.size = int(self.starts[-1])  # elements in all
        self.dtype = np.dtype(dtype)
        self.addresses = np.zeros((self.lengths.size, width), np.int64)
        self.entry_values = np.zeros((self.lengths.size, entry_width), self.dtype)
        self.formats = _formats(formats, self.dtype)
        self.clear_grads = False  # zero each gradient element once read (fused zero_grad)
        self.param_store = NEAREST  # what the last column is (see the module doc)
        self._schedules = {}
        self.rows = None  # what the entries are, for the caller (e.g. parameter indices)
        self.filled_from = None  # what the caller filled entry_values from (it refills on a change)

    @classmethod
    def single(cls, size, addresses, dtype, entry_values=(), formats=None):
        """A table of one entry: ``size`` elements at ``addresses`` (the low-level API's
        flat arrays; built with as little work as a call on a small array allows)."""
        table = cls.__new__(cls)
        table.lengths = np.array([size], np.int64)
        table.starts = np.array([0, size], np.int64)
        table.size = size
        table.dtype = np.dtype(dtype)
        table.addresses = np.array([addresses], np.int64)
        table.entry_values = np.array([entry_values], table.dtype).reshape(1, len(entry_values))
        table.formats = _formats(formats, table.dtype)
        table.clear_grads, table.param_store = False, NEAREST
        table._schedules = {}
        table.rows = table.filled_from = None
        return table

    @property
    def mirrored(self):
        """Whether the param column is a master copy rounded into the last (`MIRRORED`)."""
        return self.param_store == MIRRORED

    @mirrored.setter
    def mirrored(self, value):
        self.param_store = MIRRORED if value else NEAREST

    def __len__(self):
        return self.lengths.size

    def cpu_schedule(self, parts, block=1):
        """``(segments, part_starts)``: ``parts`` equal element ranges, part ``p`` being
        ``segments[part_starts[p]:part_starts[p + 1]]``. With ``block`` > 1 the ranges
        are equal in blocks of ``block`` elements counted from each entry's start, and
        every segment starts at a block boundary (block-wise state: a block is one
        thread's)."""
        key = ("cpu", parts, block)
        schedule = self._schedules.get(key)
        if schedule is None:
            if block > 1:
                schedule = _block_parts(self.lengths, self.blocks(block)[0], parts, block)
            elif len(self.lengths) == 1:  # the low-level API's tables, made anew each call
                schedule = _one_entry_parts(self.size, parts)
            else:
                schedule = _equal_parts(self.starts, parts)
            self._schedules[key] = schedule
        return schedule

    def blocks(self, block):
        """``(first, entries)``: the index of each entry's first block of ``block``
        elements among all entries' blocks (and their count, last), and each block's
        entry (an empty entry has no block)."""
        key = ("blocks", block)
        if key not in self._schedules:
            counts = -(-self.lengths // block)
            first = np.zeros(counts.size + 1, np.int64)
            np.cumsum(counts, out=first[1:])
            entries = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
            self._schedules[key] = first, entries
        return self._schedules[key]

    def cuda_segments(self, chunk):
        """Segments of at most ``chunk`` elements, in entry order: ``(entry, begin, end,
        segments of that entry, the first of them)``."""
        key = ("cuda", chunk)
        if key not in self._schedules:
            self._schedules[key] = _chunks(self.lengths, chunk)
        return self._schedules[key]


_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    """SplitMix64's finalizer (Stafford's variant 13) of a ``np.uint64`` array."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_keys(seed, param_keys, steps):
    """The `STOCHASTIC` companion column: per entry, a key below 2³² from the seed, the
    entry's parameter key and its step count (each an integer below 2⁶⁴)::

        key = mix(mix(mix(seed) ⊕ param_key) ⊕ step) ≫ 32

    with ``mix`` SplitMix64's finalizer (all modulo 2⁶⁴), as ``np.int64``. The bits of
    element ``i`` are then `precision.random_bits` of ``(key, i)``."""
    with np.errstate(over="ignore"):
        seed = _splitmix64(np.array([int(seed) & _MASK64], np.uint64))
        x = _splitmix64(seed ^ np.asarray(param_keys, np.uint64))
        x = _splitmix64(x ^ np.asarray(steps, np.uint64))
    return (x >> np.uint64(32)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _formats(formats, dtype):
    """(param, grad, state, companion) element types as zero scalars, which kernels type on."""
    formats = (dtype,) * 4 if formats is None else formats
    return tuple(np.dtype(kind).type(0) for kind in formats)


def _equal_parts(starts, parts):
    size = int(starts[-1])
    bounds = np.arange(parts + 1, dtype=np.int64) * size // parts
    pieces, part_starts = [], [0]
    for low, high in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        first = int(np.searchsorted(starts, low, "right")) - 1
        stop = int(np.searchsorted(starts, high, "left"))
        entries = np.arange(max(first, 0), stop if high > low else max(first, 0), dtype=np.int64)
        begin = np.maximum(low, starts[entries]) - starts[entries]
        end = np.minimum(high, starts[entries + 1]) - starts[entries]
        keep = end > begin
        pieces.append(np.stack([entries[keep], begin[keep], end[keep]], axis=1))
        part_starts.append(part_starts[-1] + int(keep.sum()))
    return np.concatenate(pieces).reshape(-1, 3), np.array(part_starts, np.int64)


@functools.lru_cache(maxsize=256)
def _one_entry_parts(size, parts):
    bounds = [part * size // parts for part in range(parts + 1)]
    segments = [(0, low, high) for low, high in zip(bounds, bounds[1:]) if high > low]
    part_starts = [0]
    for low, high in zip(bounds, bounds[1:]):
        part_starts.append(part_starts[-1] + (high > low))
    return np.array(segments, np.int64).reshape(-1, 3), np.array(part_starts, np.int64)


def _block_parts(lengths, block_starts, parts, block):
    """`_equal_parts` over the entries' blocks (``block_starts``: `TensorTable.blocks`),
    as element segments."""
    segments, part_starts = _equal_parts(block_starts, parts)
    segments = segments.copy()
    segments[:, 1] *= block
    segments[:, 2] = np.minimum(segments[:, 2] * block, lengths[segments[:, 0]])
    return segments, part_starts


def _chunks(lengths, chunk):
    # An empty entry gets one empty segment: a capturable kernel advances an entry's step
    # count when its segments are done (torch counts a step for an empty parameter too).
    counts = np.maximum(-(-lengths // chunk), 1)
    entries = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first_of_entry = np.repeat(np.cumsum(counts) - counts, counts)
    begin = (np.arange(entries.size, dtype=np.int64) - first_of_entry) * chunk
    end = np.minimum(begin + chunk, lengths[entries])
    columns = [entries, begin, end, counts[entries], first_of_entry]
    return np.stack(columns, axis=1).reshape(-1, 5)
