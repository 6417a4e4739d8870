"""Flat buffers: the parameters of one (param group, device, dtype) in one storage.

Each ``Parameter``'s ``.data`` is re-pointed to a view into ``values`` with its shape
and dense strides kept (a ``channels_last`` weight stays ``channels_last``). Gradients
and every optimizer state get the same layout, so one kernel call updates every
parameter of the buffer in one pass over memory.
"""

import torch

from .devices import kernels_for
from .dlpack import as_array, memory_order_array

FLAT = "flat"  # `gather_grads`: this parameter's gradient is its view into ``grads``


def step_dtype():
    """The dtype of ``state["step"]``, as ``torch.optim`` picks it (non-fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def dense_strides(tensor):
    """Strides of a dense tensor laid out like ``tensor`` (``preserve_format``)."""
    return torch.empty_like(tensor, device="meta", memory_format=torch.preserve_format).stride()


class FlatBuffer:
    """Values, gradients and state of some parameters, each in one contiguous tensor.

    ``offsets[i]`` is where parameter ``i`` starts in every flat tensor. Gradients that
    autograd or user code allocated are read where they are (see `gather_grads`). With
    ``flat_gradients``, a gradient that exists when the buffer is built, or that
    ``zero_grad(set_to_none=False)`` resets, becomes a view into ``grads``; autograd then
    accumulates there in place and a step is one kernel call over the whole buffer.
    """

    def __init__(self, params, names, flat_gradients=False):
        first = params[0]
        self.params = list(params)
        self.names = list(names)  # "parameter 3 of param group 0", for error messages
        self.flat_gradients = flat_gradients  # .grad may be replaced by our views
        self.initialized = [False] * len(self.params)  # has optimizer state (torch's ``state[p]``)
        self.all_initialized = False
        self.exposed_names = ()  # the state names ``state[p]`` entries were made with
        self.coefficients = (None, None)  # (hyperparameters, kernel coefficients) of last step
        self.device, self.dtype = first.device, first.dtype
        self.kernels = kernels_for(self.device)  # `kernels.cpu`, or CUDA on torch's stream
        self.numels = [p.numel() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.strides = [dense_strides(p) for p in self.params]  # of every flat view
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.size = total = self.offsets.pop()
        self.values = torch.empty(total, dtype=self.dtype, device=self.device)
        self._grads = None  # allocated when first needed: see `grads`
        self._grad_views = [None] * len(self.params)
        self.steps = torch.zeros(len(self.params), dtype=step_dtype())  # per-parameter t
        self._state = {}
        self._arrays = {}
        self._data_ptrs = [0] * len(self.params)
        with torch.no_grad():
            for index in range(len(self.params)):
                self.adopt_param(index)
                if flat_gradients and self.params[index].grad is not None:
                    self.adopt_grad(index)

    @property
    def grads(self):
        """The flat gradient buffer, allocated (zero-filled) on first use.

        A loop that always calls ``zero_grad()`` with ``set_to_none=True`` never needs
        it: its gradients are read where autograd put them.
        """
        self._allocate_grads()
        return self._grads

    def _allocate_grads(self):
        if self._grads is None:
            self._grads = torch.zeros_like(self.values)
            self._grad_views = [self.view_of(self._grads, i) for i in range(len(self.params))]

    def view_of(self, flat, index):
        """Parameter ``index``'s view into the flat tensor ``flat``."""
        return flat.as_strided(self.shapes[index], self.strides[index], self.offsets[index])

    def adopt_param(self, index):
        """Copy parameter ``index`` into ``values`` and re-point its ``.data`` there."""
        param = self.params[index]
        view = self.view_of(self.values, index)
        data = param.data
        if data.untyped_storage().data_ptr() == self.values.untyped_storage().data_ptr():
            data = data.clone()  # e.g. p.data = p.data.t(): a new view of our own memory
        view.copy_(data)
        param.data = view
        self._data_ptrs[index] = param.data_ptr()

    def adopt_grad(self, index):
        """Copy parameter ``index``'s gradient into ``grads``; with ``flat_gradients`` its
        ``.grad`` becomes that view, otherwise the user's tensor stays its ``.grad``."""
        self._allocate_grads()
        param, view = self.params[index], self._grad_views[index]
        view.copy_(param.grad)
        if self.flat_gradients:
            param.grad = view

    def bound(self):
        """Whether every parameter's data and ``.grad`` are still views into this buffer.

        Then a step needs no checks and no copies: the fast path.
        """
        if self._grads is None:  # no gradient is a view yet (all may be None)
            return False
        for param, grad_view, data_ptr, strides in zip(
            self.params, self._grad_views, self._data_ptrs, self.strides
        ):
            if param.grad is not grad_view or param.data_ptr() != data_ptr:
                return False
            if param.stride() != strides:  # e.g. p.data = p.data.t() on a square weight
                return False
        return True

    def check(self):
        """Raise before a step if a parameter or gradient can no longer be used."""
        for index, param in enumerate(self.params):
            expected = (self.dtype, self.device, self.shapes[index])
            if (param.dtype, param.device, param.shape) != expected:
                raise RuntimeError(
                    f"{self.names[index]} changed from {self.dtype} {tuple(expected[2])} on "
                    f"{self.device} to {param.dtype} {tuple(param.shape)} on {param.device} "
                    "after the optimizer was created; create the optimizer after moving or "
                    "casting the model"
                )
            grad = param.grad
            if grad is None or grad is self._grad_views[index]:
                continue
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(
                    f"{self.names[index]} has a sparse gradient; fastmomentum needs dense gradients"
                )
            if grad.dtype != self.dtype or grad.device != self.device or grad.shape != param.shape:
                raise ValueError(
                    f"{self.names[index]} has a gradient of {grad.dtype} {tuple(grad.shape)} on "
                    f"{grad.device}; expected {self.dtype} {tuple(param.shape)} on {self.device}"
                )

    def gather_grads(self):
        """Where each parameter's gradient is read from this step (call after `check`).

        Per parameter: ``None`` when it has no gradient (it is skipped, as in
        ``torch.optim``); `FLAT` when its ``.grad`` is our view; otherwise a flat array of
        the gradient tensor itself, read in place: autograd gives a gradient the
        parameter's strides, so its memory lines up with the parameter's range. Only a
        gradient laid out otherwise is copied into the flat buffer.
        """
        sources = []
        for index, param in enumerate(self.params):
            moved = param.data_ptr() != self._data_ptrs[index]
            if moved or param.stride() != self.strides[index]:
                self.adopt_param(index)  # ``p.data`` was reassigned by user code
            grad = param.grad
            if grad is None:
                sources.append(None)
            elif grad is self._grad_views[index]:
                sources.append(FLAT)
            elif grad.stride() == self.strides[index] or grad.numel() <= 1:
                sources.append(memory_order_array(grad))
            else:
                self.adopt_grad(index)
                sources.append(FLAT)
        return sources

    def zero_grads(self, set_to_none):
        """``zero_grad`` for these parameters, as ``torch.optim`` does it.

        With ``set_to_none=False`` existing gradients are zeroed in place; with
        ``flat_gradients`` they are instead replaced by zeroed views into the flat
        gradient buffer (one pass), so backward accumulates there and the next step is a
        single kernel call.
        """
        if set_to_none:
            for param in self.params:
                param.grad = None
            return
        if all(param.grad is None for param in self.params):
            return
        if self.flat_gradients:
            self.grads.zero_()
            for param, view in zip(self.params, self._grad_views):
                if param.grad is not None and param.grad is not view:
                    param.grad = view
            return
        own = self._grads is not None and any(
            param.grad is view for param, view in zip(self.params, self._grad_views)
        )
        if own:
            self.grads.zero_()  # our views: one pass
        for param, view in zip(self.params, self._grad_views):
            grad = param.grad
            if grad is None or grad is view:
                continue
            if grad.grad_fn is not None:
                grad.detach_()
            else:
                grad.requires_grad_(False)
            grad.zero_()

    def state(self, name):
        """The flat state tensor ``name`` (e.g. ``"exp_avg"``), zero-filled on first use."""
        if name not in self._state:
            self._state[name] = torch.zeros_like(self.values)
        return self._state[name]

    def array(self, name):
        """A NumPy view (zero-copy, DLPack) of ``values``, ``grads``, ``steps`` or a state."""
        if name not in self._arrays:
            flat = getattr(self, name) if name in ("values", "grads", "steps") else self.state(name)
            self._arrays[name] = as_array(flat)
        return self._arrays[name]

    def segments(self, sources=None, keys=None):
        """The kernel calls of a step: ``(start, end, key, grad)`` element ranges.

        ``sources`` comes from `gather_grads` (``None``: every gradient is our view) and
        ``keys`` holds a per-parameter key such as the step count (``None``: one key
        for all, given as ``None``). Adjacent parameters with flat gradients and equal
        keys share one range; a gradient read in place gets a range of its own. In the
        common case the whole buffer is one range: one kernel call.
        """
        if sources is None and keys is None:
            return [(0, self.size, None, self.array("grads"))] if self.size else []
        sources = [FLAT] * len(self.params) if sources is None else sources
        keys = [None] * len(self.params) if keys is None else keys
        ranges = []
        for index, (source, key) in enumerate(zip(sources, keys)):
            start = self.offsets[index]
            end = start + self.numels[index]
            if source is None or end == start:
                continue
            previous = ranges[-1] if ranges else None
            if (
                source is FLAT
                and previous is not None
                and previous[3] is FLAT
                and previous[1] == start
                and previous[2] == key
            ):
                previous[1] = end
            else:
                ranges.append([start, end, key, source])
        grads = self.array("grads") if any(r[3] is FLAT for r in ranges) else None
        return [
            (start, end, key, grads[start:end] if source is FLAT else source)
            for start, end, key, source in ranges
        ]
