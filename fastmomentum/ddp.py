"""The step inside backward under ``DistributedDataParallel``: each DDP bucket steps
once its all-reduce is done, from the averaged gradients, never from this process's own.

With ``step_in_backward=True`` an optimizer steps its buckets from post-accumulate-grad
hooks, which under DDP see the local gradient before DDP averages it; `backward`
refuses that at the first backward. :func:`step_after_all_reduce` registers instead a
DDP communication hook that all-reduces each DDP bucket exactly as DDP does by default
(torch's ``allreduce_hook``: divide by the world size, all-reduce) and, when that
all-reduce completes, steps the bucket's parameters (``BackwardSteps.step_params``).
"""

import threading
import weakref

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from . import backward

__all__ = ["step_after_all_reduce"]

# What a backward does, decided at its first DDP bucket (`_AfterAllReduce.begin`):
_STEP = "step"  # each DDP bucket steps when its all-reduce completes
_LEARN = "learn"  # the optimizer's first backward: it steps after DDP is done
_ACCUMULATE = "accumulate"  # inside `optimizer.no_step()`: DDP averages, nothing steps


def step_after_all_reduce(ddp_model, optimizer, process_group=None):
    """Make ``optimizer`` (``step_in_backward=True``) step each DDP bucket of
    ``ddp_model`` as soon as that bucket's gradients are all-reduced::

        model = DistributedDataParallel(module)
        optimizer = fastmomentum.AdamW(model.parameters(), step_in_backward=True)
        fastmomentum.ddp.step_after_all_reduce(model, optimizer)
        for inputs, targets in data:
            loss_fn(model(inputs), targets).backward()  # all-reduces and steps
            scheduler.step()  # optional; optimizer.step()/zero_grad() do no harm

    It registers DDP's communication hook (once per DDP model, before its first
    backward), with ``process_group`` (default: the model's) as its state. The numbers
    are the ordinary loop's (``backward(); step(); zero_grad()`` on DDP without a
    hook) bit for bit: the hook averages as DDP does, and a step reads the averaged
    gradients. (DDP without a hook multiplies by ``1/world_size`` where the hook
    divides: the same bits when the world size is a power of two.)

    **A backward**, in detail. Each DDP bucket is divided and all-reduced; when its
    future completes (on the process group's thread, for gloo), each of its
    parameters that has a gradient gets as ``.grad`` its averaged gradient (the view
    into DDP's bucket; with ``gradient_as_bucket_view=True`` it is that already) and
    they step, under the optimizer's lock. DDP's end of backward waits for those
    steps, then writes the bucket into ``.grad``; once it has, every parameter's
    ``.grad`` is set to ``None``. So ``optimizer.step()`` and ``zero_grad()`` after the
    backward find nothing to do, and the next backward starts from fresh gradients.
    With ``find_unused_parameters=True``, a parameter that got no gradient here but
    did in another process (DDP gives it one at its end of backward) steps then;
    one no process used keeps no gradient and does not step, as torch skips it.

    The optimizer's first backward (it learns the order gradients arrive in, and
    remakes its buckets at the end) steps everything once DDP is done, as ``step()``
    would, from the gradients DDP wrote.

    **Gradient accumulation**: use DDP's ``no_sync()``. DDP then calls no hook, so
    nothing steps and gradients add up in ``.grad``; the first backward outside it
    all-reduces the sum and steps. ``optimizer.no_step()`` is not needed (it does no
    harm). Inside ``optimizer.no_step()`` without ``no_sync()``, DDP still all-reduces
    every backward and writes the averages into ``.grad``, which the next backward
    adds to: nothing steps, and the result is the ordinary DDP loop's accumulating
    without ``no_sync`` (correct, with a collective per backward). As in torch's
    loop, do not call ``optimizer.step()`` after a backward inside ``no_sync()``: it
    would step the gradients left there, this process's own.

    **Threads.** A step from a future's ``.then`` runs on whichever thread completes
    the all-reduce (gloo's, or autograd's when it is done already); steps take the
    optimizer's lock, so they run one at a time, and the autograd thread launches no
    kernel meanwhile. Tested with Numba's ``omp`` threading layer, its parallel loops
    included.

    **Step hooks** (``register_step_pre_hook`` / ``_post_hook``) run once per
    backward that steps: the pre-hooks before the first DDP bucket steps, the
    post-hooks once DDP's end of backward is done. LR schedulers count such a backward
    as an optimizer step. ``optimizer.state``, ``state_dict`` and checkpoints are
    as without DDP.

    Tested with gloo on CPU, 2 processes: the default DDP options, small
    ``bucket_cap_mb``, ``gradient_as_bucket_view``, ``find_unused_parameters``,
    ``static_graph``, ``no_sync``. Untested: NCCL and CUDA tensors; DDP's ``join()``
    for uneven inputs (a joined process runs the hook outside any backward, where it
    only all-reduces). Not supported: DDP's ``mixed_precision`` (refused), and an
    optimizer that holds parameters DDP does not
    synchronize, or misses some it does (refused: the first would never see an
    averaged gradient, the second's gradients would never step). Returns the hook's
    state.
    """
    _check(ddp_model, optimizer)
    steps = optimizer._backward
    group = process_group if process_group is not None else ddp_model.process_group
    state = _AfterAllReduce(optimizer, group)
    ddp_model.register_comm_hook(state, _all_reduce_then_step)
    steps.by_ddp = True
    return state


def _check(ddp_model, optimizer):
    """Refuse what this hook cannot step exactly, before anything is registered."""
    if not isinstance(ddp_model, DistributedDataParallel):
        raise ValueError(
            "step_after_all_reduce takes a torch.nn.parallel.DistributedDataParallel "
            f"model, got {type(ddp_model).__name__}"
        )
    if not getattr(optimizer, "steps_in_backward", False):
        raise ValueError(
            "step_after_all_reduce needs an optimizer made with step_in_backward=True; "
            "with step_in_backward=False, DDP's ordinary loop (backward(); step()) "
            "already steps from the averaged gradients and needs no hook"
        )
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError(
            "step_after_all_reduce does not support DDP's mixed_precision: its buckets "
            "hold low-precision gradients that DDP casts back only at its end of backward"
        )
    module_params = getattr(ddp_model, "_module_parameters", None)  # less those ignored
    if module_params is None:
        module_params = list(ddp_model.module.parameters())
    synced = {id(p) for p in module_params if p.requires_grad}
    held = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    if synced != held:
        raise ValueError(
            f"the optimizer holds {len(held - synced)} parameter(s) that the DDP model "
            f"does not all-reduce and misses {len(synced - held)} that it does: with "
            "step_after_all_reduce the optimizer steps exactly the DDP model's "
            "parameters (give it ddp_model.parameters(); use another optimizer, with "
            "step_in_backward=False, for parameters outside DDP)"
        )


class _AfterAllReduce:
    """The communication hook's state: what this backward does, and what stepped."""

    def __init__(self, optimizer, process_group):
        self._optimizer = weakref.ref(optimizer)  # DDP keeps the hook's state alive
        self.process_group = process_group
        self.task = None  # the autograd graph task of the backward being handled
        self.mode = None
        self.stepped = set()  # id(param) stepped in this backward (from any thread)
        self.threads = set()  # ident of the threads that stepped (for the tests)
        self._lock = threading.Lock()

    def begin(self):
        """At each DDP bucket, on autograd's thread: at the first of a backward,
        decide what this backward does, run the step pre-hooks if it steps buckets,
        and arrange `after_ddp`."""
        task = torch._C._current_graph_task_id()
        if task < 0:  # not in a backward (DDP's join() shadows all-reduces): reduce only
            return None
        if task == self.task:
            return self.mode
        optimizer = self._optimizer()
        self.task, self.stepped = task, set()
        if optimizer is None or optimizer._backward._paused:  # DDP's all-reduce alone
            self.mode = _ACCUMULATE
            return self.mode
        steps = optimizer._backward
        self.mode = _LEARN if steps.ranks is None else _STEP
        if self.mode == _STEP:
            backward.run_pre_hooks(optimizer)
        # DDP's end of backward is an autograd final callback too, queued when its
        # last bucket is ready, which may come after this one: a callback queued from
        # a final callback runs after every callback queued so far, so after DDP's.
        _queue(lambda: _queue(self.after_ddp))
        return self.mode

    def step_bucket(self, buffer, params, views, future):
        """``.then`` of a DDP bucket's all-reduce: step its parameters that have a
        gradient, from the averaged ones, and hand DDP the bucket back."""
        reduced = future.value()
        if reduced.data_ptr() != buffer.data_ptr():  # gloo and NCCL reduce in place
            buffer.copy_(reduced)
        ready = []
        for param, view in zip(params, views):
            if param.grad is None:  # no gradient here: DDP decides at its end (`after_ddp`)
                continue
            if not _same_view(param.grad, view):
                param.grad = view
            ready.append(param)
        self._optimizer()._backward.step_params(ready)
        with self._lock:
            self.stepped.update(id(param) for param in ready)
            self.threads.add(threading.get_ident())
        return buffer

    def after_ddp(self):
        """Once DDP's end of backward has written the averaged gradients into ``.grad``:
        step what has not stepped yet, free every gradient, run the step post-hooks."""
        optimizer = self._optimizer()
        if optimizer is None:
            return
        steps = optimizer._backward
        if self.mode == _LEARN:
            backward.run_pre_hooks(optimizer)
            with steps.lock:
                optimizer._step()  # in the buckets just learned, as `step()` would
        else:
            left = [
                p
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None and id(p) not in self.stepped
            ]
            if left:  # used in another process only (find_unused_parameters)
                steps.step_params(left)
        backward.free_gradients(optimizer)
        optimizer._opt_called = True  # an optimizer step, for torch's LR schedulers
        backward.run_post_hooks(optimizer)


def _all_reduce_then_step(state, bucket):
    """The communication hook: DDP's own all-reduce, then (in a backward that steps
    buckets) the bucket's step once it completes."""
    mode = state.begin()
    future = default_hooks.allreduce_hook(state.process_group, bucket)
    if mode != _STEP:
        return future
    buffer, params, views = bucket.buffer(), bucket.parameters(), bucket.gradients()
    return future.then(lambda done: state.step_bucket(buffer, params, views, done))


def _same_view(grad, view):
    return (
        grad.data_ptr() == view.data_ptr()
        and grad.shape == view.shape
        and grad.stride() == view.stride()
        and grad.dtype == view.dtype
    )


def _queue(callback):
    torch.autograd.Variable._execution_engine.queue_callback(callback)
