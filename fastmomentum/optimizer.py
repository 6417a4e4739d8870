"""The shared base of fastmomentum's torch optimizers: param groups on flat buffers.

Subclasses say which state tensors they keep and how one flat buffer is updated; this
class does the rest as ``torch.optim.Optimizer`` does it: param groups,
``add_param_group``, ``step(closure)``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` in torch's format.
"""

import sys

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .devices import cuda_unavailable_reason
from .flat_buffer import FlatBuffer

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class FlatOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is one kernel call per flat buffer.

    For every param group the parameters are grouped by (device, dtype) into
    `FlatBuffer` objects; ``self.state[p]`` holds views into the buffers' state under
    torch's keys, so user code and ``state_dict`` see exactly what ``torch.optim`` shows.
    """

    #: Whether ``state[p]`` carries a ``"step"`` count (Adam) or not (SGD).
    counts_steps = False

    #: ``torch.amp.GradScaler`` protocol of torch's fused optimizers: the scaler sets
    #: ``grad_scale`` (unless the user called ``unscale_``) and ``found_inf`` on the
    #: optimizer; the step skips itself on inf/NaN and unscales inside the kernel.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, flat_gradients=False):
        _check_implementation_options(defaults)
        self._flat_gradients = flat_gradients
        self._buffers = []  # per param group, its FlatBuffers
        self._checked = []  # per param group, the settings last found valid
        super().__init__(params, defaults)
        self._state_seen = (self.state, len(self.state))

    def state_names(self, group):
        """Names of the per-parameter state tensors ``group`` keeps, in torch's order."""
        raise NotImplementedError

    def settings(self, group):
        """The group's hyperparameters as a tuple of plain numbers and flags, read each step."""
        raise NotImplementedError

    def check_settings(self, settings):
        """Raise ``ValueError`` for invalid hyperparameters (torch's messages)."""
        raise NotImplementedError

    def update(self, group, buffer, settings, sources, grad_scale):
        """Step ``buffer``'s parameters, reading gradients from ``sources``.

        ``sources`` is `FlatBuffer.gather_grads`'s list, or ``None`` when every gradient
        is the parameter's view into the flat gradient buffer. ``grad_scale`` is the AMP
        loss scale to divide gradients by, or ``None``.
        """
        raise NotImplementedError

    def check_group(self, group):
        self.check_settings(self.settings(group))

    def add_param_group(self, param_group):
        """Add a param group (as ``torch.optim``) and move its parameters into flat buffers."""
        add = torch.optim.Optimizer.add_param_group
        if "torch._dynamo" not in sys.modules:
            # torch's version imports torch._dynamo on first use (≈1 s here) only to keep
            # torch.compile from tracing it, and nothing compiles before that import.
            add = add.__wrapped__
        add(self, param_group)
        group = self.param_groups[-1]
        try:
            self.check_group(group)
            _check_implementation_options(group)
            _check_params(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        self._buffers.append(self._make_buffers(group, len(self.param_groups) - 1))
        self._checked.append(None)

    def step(self, closure=None):
        """One optimization step; ``closure`` (optional) reruns the model and returns the loss."""
        if torch.compiler.is_compiling():
            # Inside a function that torch.compile traces: the Numba kernels cannot be
            # traced, so the step runs eagerly, a graph break (torch.compiler.disable).
            return torch.compiler.disable(self._eager_step)(closure)
        return self._eager_step(closure)

    def _eager_step(self, closure):
        if type(self).step is FlatOptimizer.step and self._step_is_observed():
            return self._observed_step(closure)
        return self._step(closure)  # (a subclass's own step is wrapped by torch already)

    # torch.optim wraps every optimizer's ``step`` in a function that runs the step hooks
    # and opens a profiler range: ≈9 µs a step here, as much as our whole step costs on a
    # small model. Marked as hooked, our ``step`` is left alone and takes that same
    # wrapper only when a hook is registered or the profiler is running.
    step.hooked = True

    def _step_is_observed(self):
        return bool(
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        )

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return loss  # GradScaler found inf/NaN gradients: nothing moves, as in torch
        grad_scale = getattr(self, "grad_scale", None)
        grad_scale = None if grad_scale is None else float(grad_scale)
        seen_state, seen_size = self._state_seen
        if self.state is not seen_state or len(self.state) != seen_size:
            self._bind_state()  # user code replaced, cleared or deleted state entries
        all_settings = []
        for index, group in enumerate(self.param_groups):
            settings = self.settings(group)
            if settings != self._checked[index]:  # checked once, not every step
                self.check_settings(settings)
                self._checked[index] = settings
            all_settings.append(settings)
        bound = [[buffer.bound() for buffer in buffers] for buffers in self._buffers]
        for buffers, flags in zip(self._buffers, bound):  # every check before any update
            for buffer, is_bound in zip(buffers, flags):
                if not is_bound:
                    buffer.check()
        for group, settings, buffers, flags in zip(
            self.param_groups, all_settings, self._buffers, bound
        ):
            for buffer, is_bound in zip(buffers, flags):
                if is_bound:
                    self.update(group, buffer, settings, None, grad_scale)
                    continue
                with torch.no_grad():
                    sources = buffer.gather_grads()
                if any(source is not None for source in sources):
                    self.update(group, buffer, settings, sources, grad_scale)
        if grad_scale is not None:
            self._unscale_grads(grad_scale)
        self._state_seen = (self.state, len(self.state))
        return loss

    @torch.no_grad()
    def _unscale_grads(self, grad_scale):
        """Leave the gradients unscaled after an AMP step, as torch's fused optimizers do."""
        grads = self._grads_to_touch()
        if grads:
            torch._foreach_mul_(grads, 1.0 / grad_scale)

    def _grads_to_touch(self):
        """Every gradient tensor once: a buffer's flat gradients if all are its views."""
        grads = []
        for buffers in self._buffers:
            for buffer in buffers:
                if buffer.bound() and buffer.size:
                    grads.append(buffer.grads)
                else:
                    grads.extend(p.grad for p in buffer.params if p.grad is not None)
        return grads

    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters.

        Scales every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in place and
        returns the total norm. Where a buffer's gradients are all its flat views, the
        norm and the scaling each take one pass over the whole buffer instead of one call
        per parameter.
        """
        grads = self._grads_to_touch()
        if not grads:
            return torch.tensor(0.0)
        norms = [torch.linalg.vector_norm(grad, norm_type) for grad in grads]
        first_device = norms[0].device
        total = torch.linalg.vector_norm(
            torch.stack([norm.to(first_device) for norm in norms]), norm_type
        )
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        clip_coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(clip_coefficient.to(grad.device))
        return total

    def zero_grad(self, set_to_none=True):
        """Reset the gradients: to ``None`` (default) or to zero in place, as ``torch.optim``."""
        for buffers in self._buffers:
            for buffer in buffers:
                buffer.zero_grads(set_to_none)

    def expose_new_state(self, group, buffer, sources):
        """`expose_state` for every parameter stepped (see `update`) that has none yet, and
        again for all if the group's state names changed (``amsgrad`` switched on)."""
        renamed = buffer.exposed_names != self.state_names(group)
        for index, initialized in enumerate(buffer.initialized):
            stepped = sources is None or sources[index] is not None
            if (not initialized and stepped) or (initialized and renamed):
                self.expose_state(group, buffer, index)
        buffer.exposed_names = self.state_names(group)
        buffer.all_initialized = all(buffer.initialized)

    def expose_state(self, group, buffer, index):
        """Make ``self.state[p]`` of ``buffer``'s parameter ``index`` views into its flat state."""
        entry = {}
        if self.counts_steps:
            entry["step"] = buffer.steps[index]
        for name in self.state_names(group):
            entry[name] = buffer.view_of(buffer.state(name), index)
        self.state[buffer.params[index]] = entry
        buffer.initialized[index] = True

    def state_dict(self):
        """``torch.optim``'s state dict, with copies of the state tensors.

        The live state tensors are views into flat buffers: handed out as they are, each
        would pickle the whole buffer, and a checkpoint would alias the running state.
        """
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {key: _copy(value) for key, value in entry.items()}
            for index, entry in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a ``torch.optim`` or fastmomentum state dict; values are copied into the buffers.

        Everything is checked first: on a mismatch nothing changes.
        """
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        self._checked = [None] * len(self.param_groups)
        self._bind_state()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in self.defaults.items():
                group.setdefault(name, default)
        if "_buffers" not in self.__dict__:  # unpickled or deep-copied: rebuild the buffers
            self._buffers = [
                self._make_buffers(group, index) for index, group in enumerate(self.param_groups)
            ]
            self._checked = [None] * len(self.param_groups)
            self._bind_state()

    def _bind_state(self):
        """Make the flat buffers hold what ``self.state`` says, and ``self.state`` views of them.

        Runs after a load, an unpickling, and when user code replaced, cleared or
        deleted entries of ``self.state`` (torch's way to reset an optimizer's state).
        """
        with torch.no_grad():
            for group, buffers in zip(self.param_groups, self._buffers):
                for buffer in buffers:
                    self._bind_buffer_state(group, buffer)
        self._state_seen = (self.state, len(self.state))

    def _bind_buffer_state(self, group, buffer):
        names = self.state_names(group)
        saved = []
        for param in buffer.params:  # copies first: the entries may be views of the buffers
            entry = self.state.pop(param, {})
            if not entry or any(entry.get(name) is None for name in names):
                saved.append(None)
                continue
            step = float(entry["step"]) if self.counts_steps else None
            saved.append((step, {name: entry[name].detach().clone() for name in names}))
        if self.counts_steps:
            buffer.steps.zero_()
        for name in names:
            buffer.state(name).zero_()  # parameters without saved state start afresh
        for index, entry in enumerate(saved):
            buffer.initialized[index] = False
            if entry is None:
                continue
            step, values = entry
            for name, value in values.items():
                buffer.view_of(buffer.state(name), index).copy_(value)
            if self.counts_steps:
                buffer.steps[index] = step
            self.expose_state(group, buffer, index)
        buffer.exposed_names = names
        buffer.all_initialized = all(buffer.initialized)
        buffer.coefficients = (None, None)

    def _make_buffers(self, group, group_index):
        by_kind = {}
        for position, param in enumerate(group["params"]):
            name = f"parameter {position} of param group {group_index}"
            by_kind.setdefault((param.device, param.dtype), []).append((param, name))
        flat = self.__dict__.get("_flat_gradients", False)
        return [FlatBuffer(*zip(*members), flat) for members in by_kind.values()]

    def _check_loadable(self, state_dict):
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups; "
                f"this optimizer has {len(self.param_groups)}"
            )
        params_by_id = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {index} of the loaded state dict has {len(saved['params'])} "
                    f"parameters; this optimizer's has {len(group['params'])}"
                )
            merged = {**self.defaults, **saved, "params": group["params"]}
            self.check_group(merged)
            _check_implementation_options(merged)
            for param_id, param in zip(saved["params"], group["params"]):
                params_by_id[param_id] = (param, merged)
        for param_id, entry in state_dict["state"].items():
            if param_id not in params_by_id:
                raise ValueError(f"loaded state dict has state for unknown parameter id {param_id}")
            param, group = params_by_id[param_id]
            names = self.state_names(group)
            if all(entry.get(name) is None for name in names):
                continue  # {} or {"momentum_buffer": None}: no state yet
            for name in names:
                value = entry.get(name)
                if not torch.is_tensor(value) or value.shape != param.shape:
                    shape = tuple(value.shape) if torch.is_tensor(value) else repr(value)
                    raise ValueError(
                        f"loaded state {name!r} of parameter id {param_id} has shape {shape}; "
                        f"the parameter has shape {tuple(param.shape)}"
                    )
            if self.counts_steps and "step" not in entry:
                raise ValueError(f"loaded state of parameter id {param_id} has no 'step'")


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def host_float(value, name):
    """A hyperparameter as a Python float; a GPU tensor is refused, since reading it every
    step would make the host wait for the GPU."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.device.type != "cpu":
            raise ValueError(
                f"{name} is a tensor on {value.device}; pass a float or a CPU tensor (reading "
                "a GPU value would synchronise every step)"
            )
    return float(value)


def _check_implementation_options(options):
    """Accept torch's implementation switches only with values we honour."""
    if options.get("differentiable"):
        raise ValueError("fastmomentum does not support differentiable=True")
    if options.get("capturable"):
        raise ValueError("fastmomentum does not support capturable=True (CUDA graph capture)")
    if options.get("foreach") and options.get("fused"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _check_params(params):
    """Raise for parameters a flat buffer cannot hold, before any of them is touched."""
    seen = set()
    extents = []
    for position, param in enumerate(params):
        name = f"parameter {position}"
        if id(param) in seen:
            raise ValueError(f"{name} appears twice in the param group")
        seen.add(id(param))
        if param.is_complex():
            raise TypeError(f"{name} is complex ({param.dtype}); fastmomentum supports real params")
        if param.layout != torch.strided:
            raise TypeError(f"{name} has layout {param.layout}; fastmomentum needs dense params")
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {param.dtype}; fastmomentum supports float32 and float64"
            )
        if param.device.type == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise ValueError(f"{name} is on {param.device}: {reason}")
        elif param.device.type != "cpu":
            raise ValueError(f"{name} is on {param.device}; fastmomentum runs on CPU and CUDA")
        if param.grad is not None and param.grad.is_sparse:
            raise TypeError(f"{name} has a sparse gradient; fastmomentum needs dense gradients")
        if param.numel():
            start = param.data_ptr()
            span = 1 + sum((size - 1) * stride for size, stride in zip(param.shape, param.stride()))
            extents.append((start, start + span * param.element_size(), name))
    extents.sort()
    for (_, end, name), (start, _, other) in zip(extents, extents[1:]):
        if start < end:
            raise ValueError(
                f"{name} and {other} overlap in memory; a flat buffer needs disjoint params"
            )
