"""The step inside backward (``step_in_backward=True``): each bucket steps the moment its
last gradient is accumulated, and those gradients are freed right after.

A post-accumulate-grad hook on every parameter counts the gradients of its bucket as
they arrive; the bucket that is complete is stepped in one launch, with its group's
hyperparameters as they are at that moment, and its parameters' ``.grad`` set to
``None``. So gradients live only while their bucket fills, and the step reads them
while they are still in cache. At the end of backward (a callback autograd runs once
the graph is done), buckets that got only some of their gradients step what they got,
and anything the buckets cannot step at once (a parameter cast or moved since, a new
group) steps through the ordinary `FlatOptimizer._step`. Numbers equal the ordinary
loop's (``backward(); step(); zero_grad()``) bit for bit: the rules are per element,
and each bucket steps exactly the parameters that have a gradient, as ``step`` would.

Buckets follow the order in which gradients arrive and hold at most
``bucket_elements`` elements each (DDP bounds its buckets in bytes). The order is
learned from the first backward, as DDP rebuilds its buckets after its first
iteration: that backward steps nothing inside it; at its end the buckets are made in
the order seen, then it steps as ``step()`` would (so the state is made once, in its
final place). Parameters that got no gradient in that backward go last.

Inside ``with optimizer.no_step():`` a backward only accumulates (as DDP's
``no_sync``); the first backward outside it steps with the sum.
"""

import contextlib
import itertools
import operator
import threading
import weakref

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import binding, casts, launches

#: The default bound of a bucket in this mode, in elements: 16 MiB of float32 gradients,
#: 8 MiB of 16-bit ones (DDP's buckets are 25 MB). A bucket's gradients are alive at
#: once: on the GPT-like 97.7M model (bench/NOTES.md, entry 21) this keeps bfloat16's
#: at its largest tensor's, 0.13 bytes a parameter (25 MiB of them: 0.25), and float32's
#: peak as low as with 25 MiB buckets (8 MiB ones measured 0.2-0.3 B/param more, the
#: allocator's). Gradients of that size still lie in the last-level cache as they step.
BUCKET_ELEMENTS = 4 * 2**20


class BackwardSteps:
    """Steps ``optimizer``'s buckets from its parameters' post-accumulate-grad hooks."""

    def __init__(self, optimizer, bucket_elements=None):
        self._optimizer = weakref.ref(optimizer)  # hooks must not keep it alive
        self.bucket_elements = BUCKET_ELEMENTS if bucket_elements is None else bucket_elements
        #: id(param) -> its place in the order gradients arrived (None: not learned)
        self.ranks = None
        #: Whether a DDP communication hook steps the buckets (`fastmomentum.ddp`)
        self.by_ddp = False
        self.lock = threading.Lock()  # steps from DDP's communication threads
        self._handles = {}  # id(param) -> hook handle
        self._paused = 0  # depth of `no_step`
        self._task = None  # id of the autograd graph task being stepped
        self._stepping = False  # whether that backward steps (not inside `no_step`)
        self._arrivals = None  # params in arrival order, in a backward that learns
        self._made = None  # the GroupBuckets the maps below were made from
        self._where = {}  # id(param) -> (group index, bucket, row)
        self._groups = {}  # bucket -> group index
        self._left = {}  # bucket -> gradients still to arrive in this backward
        self._elsewhere = False  # a gradient that no bucket of the maps steps
        weakref.finalize(optimizer, _remove, self._handles)

    # --- hooks ------------------------------------------------------------------------

    def watch(self, params):
        """Hook every parameter of ``params`` that takes gradients and has no hook yet."""
        for param in params:
            if param.requires_grad and id(param) not in self._handles:
                self._handles[id(param)] = param.register_post_accumulate_grad_hook(self._arrived)

    @contextlib.contextmanager
    def paused(self):
        """Backward passes inside only accumulate gradients."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _arrived(self, param):
        """Post-accumulate-grad hook: ``param.grad`` holds its gradient for this backward."""
        optimizer = self._optimizer()
        if optimizer is None:
            return
        with self.lock:  # CUDA parameters' hooks run on autograd's device threads
            self._count(optimizer, param)

    def _count(self, optimizer, param):
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first gradient of this backward
            self._begin(optimizer, task)
        if self._arrivals is not None:
            self._arrivals.append(param)
        if not self._stepping or self.by_ddp or self.ranks is None:
            return
        where = self._where.get(id(param))
        if where is None:
            self._elsewhere = True  # e.g. a parameter of a group appended since
            return
        group_index, bucket, _ = where
        left = self._left[bucket] = self._left[bucket] - 1
        if left == 0:
            self._launch(optimizer, group_index, bucket)
        elif left < 0:  # its bucket stepped already (a hook added meanwhile): at the end
            self._elsewhere = True

    def _begin(self, optimizer, task):
        self._task = task
        self._stepping = not self._paused
        self._elsewhere = False
        self._arrivals = [] if self.ranks is None else None
        torch.autograd.Variable._execution_engine.queue_callback(self._end)
        if not self._stepping:
            return
        refuse_scaler(optimizer)
        all_buckets = optimizer._buckets_now(stepping=True)
        if not self.by_ddp and not all(b.distributed for bs in all_buckets for b in bs):
            refuse_unreduced(optimizer)  # FSDP2 calls a DTensor's hooks once reduced
        if binding.state_changed(optimizer):
            binding.bind_state(optimizer)
        made = self._made
        if (
            made is None
            or len(made) != len(all_buckets)
            or any(map(operator.is_not, all_buckets, made))
        ):
            self._map(all_buckets)
        # read each backward: user code may freeze or unfreeze parameters between them
        self._left = {
            bucket: sum(param.requires_grad for param in bucket.params)
            for buckets in all_buckets
            for bucket in buckets
        }
        if self.ranks is not None and not self.by_ddp:
            run_pre_hooks(optimizer)

    def _map(self, all_buckets):
        self._made = tuple(all_buckets)
        self._where = {
            id(param): (index, bucket, row)
            for index, buckets in enumerate(all_buckets)
            for bucket in buckets
            for row, param in enumerate(bucket.params)
        }
        self._groups = {
            bucket: index for index, buckets in enumerate(all_buckets) for bucket in buckets
        }

    def _end(self):
        """Autograd's callback once the backward is done."""
        optimizer = self._optimizer()
        self._task = None
        if optimizer is not None:
            with self.lock:
                self._finish(optimizer)

    def _finish(self, optimizer):
        learned = self._arrivals is not None
        if learned:
            self.learn(optimizer, self._arrivals)
            self._arrivals = None
        self.watch(p for group in optimizer.param_groups for p in group["params"])
        if not self._stepping:
            return
        if self.by_ddp:
            return  # `fastmomentum.ddp` steps, once each bucket is all-reduced
        if learned:
            run_pre_hooks(optimizer)
        else:  # buckets short of a gradient (a parameter unused in this backward), and
            # gradients accumulated inside `no_step` of parameters this one did not reach
            for bucket, left in self._left.items():
                if left > 0 and any(param.grad is not None for param in bucket.params):
                    self._launch(optimizer, self._groups[bucket], bucket)
        if learned or self._elsewhere:
            optimizer._step()  # whatever still has a gradient, as `step()` steps it
            free_gradients(optimizer)
        optimizer._opt_called = True  # an optimizer step, for torch's LR schedulers
        run_post_hooks(optimizer)

    def _launch(self, optimizer, group_index, bucket):
        """Step ``bucket`` now (its group's hyperparameters as they are) and free its
        gradients; left to the end of backward when its parameters changed since it
        was made."""
        self._left[bucket] = 0
        group = optimizer.param_groups[group_index]
        settings = optimizer.settings(group)
        try:
            plans = [bucket.planner.plan(rows) for rows in [None, *bucket.repeats]]
        except launches.Remake:
            self._elsewhere = True  # made again by the ordinary step at the end
            return
        casts.refuse_unsteppable(optimizer, [settings], [[(bucket, plans)]])
        optimizer._step_bucket(group, settings, bucket, plans)
        for param in bucket.params:
            param.grad = None

    def step_params(self, params):
        """Step ``params`` now, from the gradients their ``.grad`` holds (a DDP
        communication hook's, once their all-reduce is done: `fastmomentum.ddp`), each
        in its bucket, with its group's hyperparameters as they are. Called from any
        thread; steps never run two at a time."""
        optimizer = self._optimizer()
        if optimizer is None:
            return
        rows = {}
        for param in params:
            where = self._where.get(id(param))
            if where is None:
                raise RuntimeError(
                    "a parameter of the DDP bucket is not among the optimizer's parameters "
                    "that take gradients; give the optimizer every parameter of the model"
                )
            group_index, bucket, row = where
            rows.setdefault((group_index, bucket), set()).add(row)
        with self.lock:
            for (group_index, bucket), only in rows.items():
                group = optimizer.param_groups[group_index]
                settings = optimizer.settings(group)
                plans = [bucket.planner.plan(only)]
                casts.refuse_unsteppable(optimizer, [settings], [[(bucket, plans)]])
                optimizer._step_bucket(group, settings, bucket, plans)

    # --- the order of the buckets -----------------------------------------------------

    def learn(self, optimizer, arrivals):
        """Take the order of ``arrivals`` as the buckets' and make them again in it."""
        ranks = {}
        for param in arrivals:
            ranks.setdefault(id(param), len(ranks))
        self.ranks = ranks
        optimizer.buckets[:] = [None] * len(optimizer.buckets)
        optimizer._buckets_now()

    def order(self, params):
        """The positions of ``params`` (one group's, of one kind) in the order their
        gradients arrive: as learned; else, and for parameters that got no gradient
        then, last to first, as DDP assumes before it learns."""
        ranks = self.ranks or {}
        unseen = len(ranks) + len(params)
        return sorted(
            range(len(params)),
            key=lambda position: ranks.get(id(params[position]), unseen - position),
        )


def split_in_order(optimizer, params):
    """``params`` (one group's, of one device and dtype) as the lists of positions of
    its buckets: in the order gradients arrive, each at most ``bucket_elements`` (a larger
    parameter alone); ``[all positions]`` when the optimizer steps after backward."""
    steps = optimizer.__dict__.get("_backward")
    if steps is None:
        return [list(range(len(params)))]
    chunks, chunk, size = [], [], 0
    for position in steps.order(params):
        local = params[position]
        local = local.to_local() if hasattr(local, "to_local") else local
        if chunk and size + local.numel() > steps.bucket_elements:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(position)
        size += local.numel()
    if chunk:
        chunks.append(chunk)
    return chunks


def check_params(optimizer, group):
    """Refuse, before anything is made, a parameter listed twice, in this group or in
    another: torch steps it once per listing from one gradient, which this mode frees
    after the first."""
    seen = {
        id(p) for other in optimizer.param_groups if other is not group for p in other["params"]
    }
    for position, param in enumerate(group["params"]):
        if id(param) in seen:
            raise ValueError(
                f"parameter {position} is listed more than once in the param groups: with "
                "step_in_backward=True each parameter steps once per backward; list it once"
            )
        seen.add(id(param))


def free_gradients(optimizer):
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    optimizer._first_iteration.gradients_freed()


def refuse_scaler(optimizer):
    """A ``torch.amp.GradScaler`` cannot work with steps inside backward."""
    if optimizer.__dict__.get("found_inf") is not None or (
        optimizer.__dict__.get("grad_scale") is not None
    ):
        raise RuntimeError(
            "step_in_backward=True cannot be used with torch.amp.GradScaler: each bucket "
            "steps as soon as its gradients are ready, so an inf or NaN found in a later "
            "bucket cannot undo the steps already taken, and the gradients reach the step "
            "still scaled. Train with bfloat16 autocast "
            "(torch.autocast(device_type, dtype=torch.bfloat16)), which needs no scaler, "
            "or keep float16 and the scaler with step_in_backward=False"
        )


def refuse_unreduced(optimizer):
    """Under DDP a post-accumulate hook sees this process's own, unreduced gradient."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"step_in_backward=True in a process group of {dist.get_world_size()} "
            "processes: a gradient is stepped the moment backward accumulates it, before "
            "DistributedDataParallel averages it over the processes. Register the step "
            "as DDP's communication hook, so that each DDP bucket steps after its "
            "all-reduce: fastmomentum.ddp.step_after_all_reduce(ddp_model, optimizer)"
        )


def run_pre_hooks(optimizer):
    """The step's pre-hooks (``register_step_pre_hook``, global ones first), before the
    first bucket of a backward steps. They are called with no arguments, and what they
    return is not used: this step takes none."""
    hooks = itertools.chain(
        _global_optimizer_pre_hooks.values(), optimizer._optimizer_step_pre_hooks.values()
    )
    for hook in hooks:
        hook(optimizer, (), {})


def run_post_hooks(optimizer):
    """The step's post-hooks, once the last bucket of a backward has stepped."""
    optimizer._optimizer_step_code()
    hooks = itertools.chain(
        optimizer._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
    )
    for hook in hooks:
        hook(optimizer, (), {})


def _remove(handles):
    for handle in handles.values():
        handle.remove()
    handles.clear()
