"""Memory per parameter and time of a training iteration, for every way to run AdamW.

    python -m bench.memory [--quick] [--modes NAME ...] [--iterations 6] [--rounds 15]
                           [--no-timing] [--threads N] [--output bench/results]

Memory (issue 19, point 7; issue 20, point 4): the GPT-like model of the issues
(vocabulary 8192, width 768, 12 pre-LayerNorm blocks, untied embedding and head: 97.7M
parameters, the largest tensor 6.4% of them; batch 2 sequences of 32 tokens) trained
with each mode in a fresh process.
The baseline is the resident memory after the imports; building the model and the
optimizer is part of what is measured. After some warm-up iterations the kernel's peak
counter is reset (``5`` written to ``/proc/self/clear_refs`` resets ``VmHWM``; where
that is refused a thread samples ``VmRSS``) and ``VmHWM`` read after the measured ones.
Reported per parameter: the peak over the baseline; the model state (parameters,
optimizer state and the most gradient bytes alive at once, from tensor sizes); the
one-off cost of code (compiled kernels, lazily imported modules: measured by one
iteration of the same mode on a tiny model before the baseline is taken, so it is in
the peak as it would be anyway, and counted apart); and the rest, activations and what
the allocator holds.

Time: whole iterations (forward, backward, step) of torch fused AdamW's ordinary loop,
ours, and ours with the step inside backward, on the GPT-like model and on a ResNet-like
model of 200 small tensors; each model in its own process with one identical copy per
mode, the modes taking turns (an untimed then a timed iteration per turn), medians and
ratios to torch fused.

Writes ``memory.{json,md,png}`` to ``bench/out/`` (untracked) or to ``--output``;
``--quick``: tiny models, 2 iterations, a smoke test of the whole pipeline.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cli

ROOT = Path(__file__).resolve().parents[1]

# --- modes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way to train: whose AdamW, its options, the parameters' dtype, and whether
    the step runs inside backward (the loop is then ``loss.backward()`` alone)."""

    provider: str  # "torch" or "ours"
    options: dict = field(default_factory=dict)
    param_dtype: str = "float32"

    @property
    def in_backward(self):
        return bool(self.options.get("step_in_backward"))


MODES = {
    "torch fused": Mode("torch", {"fused": True}),
    "ours": Mode("ours"),
    "ours, bf16 state": Mode("ours", {"state_dtype": "bfloat16"}),
    "ours, int8 state": Mode("ours", {"state_dtype": "int8_blockwise"}),
    "torch fused, bf16 params": Mode("torch", {"fused": True}, "bfloat16"),
    "ours, bf16 params + master weights": Mode("ours", {"master_weights": True}, "bfloat16"),
    "ours in backward": Mode("ours", {"step_in_backward": True}),
    "ours in backward, int8 state": Mode(
        "ours", {"step_in_backward": True, "state_dtype": "int8_blockwise"}
    ),
    "ours, bf16 params + stochastic rounding": Mode(
        "ours", {"stochastic_rounding": True}, "bfloat16"
    ),
    "ours in backward, bf16 params + stochastic rounding + int8 state": Mode(
        "ours",
        {"step_in_backward": True, "state_dtype": "int8_blockwise", "stochastic_rounding": True},
        "bfloat16",
    ),
}

#: The modes timed against each other (the first is the reference of the ratios).
TIMED_MODES = ("torch fused", "ours", "ours in backward")

#: Issues 19 and 20's targets, bytes per parameter at the peak (None: no more than
#: torch fused's). Issue 20 also bounds the last mode's model state: 4.2.
TARGETS = {
    "ours": None,
    "ours in backward": 14.5,
    "ours in backward, int8 state": 8.5,
    "ours in backward, bf16 params + stochastic rounding + int8 state": 5.5,
}


class Unavailable(Exception):
    """The installed fastmomentum lacks an option this mode needs (the row is skipped)."""


def make_optimizer(mode, params):
    """``mode``'s AdamW over ``params``; `Unavailable` if fastmomentum lacks an option."""
    import torch

    import fastmomentum

    options = dict(mode.options)
    if options.get("state_dtype") == "bfloat16":
        options["state_dtype"] = torch.bfloat16
    if mode.provider == "torch":
        return torch.optim.AdamW(params, **options)
    try:
        return fastmomentum.AdamW(params, **options)
    except TypeError as error:
        missing = [key for key in options if key in str(error)]
        if not missing:
            raise
        raise Unavailable(
            f"fastmomentum.AdamW has no {missing[0]}= keyword yet ({error})"
        ) from error


# --- models ---------------------------------------------------------------------------

#: name -> (kind, size settings); the quick ones stand in for them under ``--quick``.
MODELS = {
    "GPT-like 97.7M": (
        "gpt",
        {"vocab": 8192, "width": 768, "layers": 12, "heads": 12, "batch": 2, "tokens": 32},
    ),
    "ResNet-like": ("resnet", {"widths": (16, 32, 64, 128), "blocks": 8, "batch": 16, "side": 32}),
}
QUICK_MODELS = {
    "GPT-like 97.7M": (
        "gpt",
        {"vocab": 256, "width": 32, "layers": 2, "heads": 2, "batch": 2, "tokens": 8},
    ),
    "ResNet-like": ("resnet", {"widths": (4, 8), "blocks": 1, "batch": 2, "side": 8}),
}
#: The model whose memory is measured.
MEMORY_MODEL = "GPT-like 97.7M"


def _gpt_classes():
    """The GPT-like model's classes (made on first use: importing this module imports
    no torch)."""
    import torch
    from torch import nn
    from torch.nn import functional

    class Block(nn.Module):
        """A pre-LayerNorm transformer block: causal self-attention, then a 4x MLP."""

        def __init__(self, width, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )

        def forward(self, x):
            batch, tokens, width = x.shape
            q, k, v = (
                part.view(batch, tokens, self.heads, -1).transpose(1, 2)
                for part in self.qkv(self.ln1(x)).split(width, dim=2)
            )
            attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        """Token and position embeddings, blocks, a final LayerNorm and an untied head."""

        def __init__(self, vocab, width, layers, heads, tokens):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(tokens, width)
            self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
            self.ln = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab, bias=False)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1], device=ids.device)
            return self.head(self.ln(self.blocks(self.tokens(ids) + self.positions(positions))))

    return GPT


def _resnet(widths, blocks):
    """A CIFAR-style ResNet of basic blocks: ``blocks`` per width, 6 parameter tensors
    each (two convolutions, two batch norms), downsampling between widths."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, inputs, outputs, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs),
                nn.ReLU(), nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
                nn.BatchNorm2d(outputs),
            )  # fmt: skip
            self.shortcut = nn.Identity()
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
                )

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    previous = widths[0]
    for stage, width in enumerate(widths):
        for index in range(blocks):
            layers.append(BasicBlock(previous, width, 2 if stage and not index else 1))
            previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, 10)]
    return nn.Sequential(*layers)


def build(kind, settings, param_dtype="float32", seed=0):
    """``(model, loss)``: the model (seeded, in ``param_dtype``) and a function computing
    the loss of one fixed batch, the same for every mode."""
    import torch
    from torch.nn import functional

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    dtype = getattr(torch, param_dtype)
    batch = settings["batch"]
    if kind == "gpt":
        model = _gpt_classes()(
            *(settings[key] for key in ("vocab", "width", "layers", "heads", "tokens"))
        ).to(dtype)
        ids = torch.randint(
            0, settings["vocab"], (batch, settings["tokens"] + 1), generator=generator
        )
        inputs, targets = ids[:, :-1], ids[:, 1:]

        def loss():
            logits = model(inputs)
            return functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    else:
        model = _resnet(settings["widths"], settings["blocks"]).to(dtype)
        side = settings["side"]
        images = torch.randn(batch, 3, side, side, generator=generator, dtype=dtype)
        labels = torch.randint(0, 10, (batch,), generator=generator)

        def loss():
            return functional.cross_entropy(model(images), labels)

    return model, loss


def iterate(mode, loss, optimizer):
    """One training iteration: the ordinary loop, or backward alone when the step runs
    inside it."""
    loss().backward()
    if not mode.in_backward:
        optimizer.step()
        optimizer.zero_grad()


# --- resident memory ------------------------------------------------------------------


def status_bytes(name):
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


class PeakMeter:
    """The peak resident memory from `start` on: the kernel's ``VmHWM`` after resetting
    it, or, where resetting is refused, the largest ``VmRSS`` a thread sees every 2 ms."""

    def start(self):
        gc.collect()
        self._samples = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after writing 5 to /proc/self/clear_refs"
            if status_bytes("VmHWM") <= status_bytes("VmRSS") + (1 << 20):
                return
        except OSError:
            pass
        self.method = "VmRSS sampled every 2 ms"
        self._samples = [status_bytes("VmRSS")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.002):
            self._samples.append(status_bytes("VmRSS"))

    def stop(self):
        """The peak in bytes since `start`."""
        if self._samples is None:
            return status_bytes("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(*self._samples, status_bytes("VmRSS"))


# --- what the model state holds -------------------------------------------------------


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer):
    """The bytes of every tensor in ``optimizer.state`` (moments, codes and absmax,
    master copies, step counts)."""
    import torch

    return tensor_bytes(
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class GradientWatch:
    """Hooks that record the most gradient bytes alive at once during the backward
    passes run while `active` is true. Registered before the optimizer's own hooks, so
    each sees a gradient before a step in backward frees it (hooks run in the order they
    were registered). Only a steady iteration counts: the first backward in backward
    steps everything at its end, after learning the order gradients arrive in."""

    def __init__(self, params):
        self.params, self.active, self.peak = params, False, 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, _):
        if self.active:
            alive = tensor_bytes(p.grad for p in self.params if p.grad is not None)
            self.peak = max(self.peak, alive)

    def remove(self):
        for handle in self.handles:
            handle.remove()


# --- one mode's memory, in its own process --------------------------------------------


def measure_code(mode):
    """The resident bytes one iteration of ``mode`` on a tiny model adds to a process
    that has only imported: the compiled kernels and the modules loaded on first use, a
    cost per process, not per parameter (the memory runs pay it inside their peak)."""
    gc.collect()
    imported = status_bytes("VmRSS")
    kind, settings = QUICK_MODELS[MEMORY_MODEL]
    model, loss = build(kind, settings, mode.param_dtype)
    iterate(mode, loss, make_optimizer(mode, model.parameters()))
    del model, loss
    gc.collect()
    return {"code_bytes": status_bytes("VmRSS") - imported}


def measure_memory(mode, kind, settings, warmup, iterations):
    """One memory run of ``mode`` training the model ``(kind, settings)``, in a process
    that has only imported (`child_main`): resident memory at each stage and the peak
    of the steady iterations over the baseline, and the model state's bytes."""
    gc.collect()
    baseline = status_bytes("VmRSS")
    model, loss = build(kind, settings, mode.param_dtype)
    params = list(model.parameters())
    after_model = status_bytes("VmRSS")
    watch = GradientWatch(params)
    optimizer = make_optimizer(mode, params)
    after_optimizer = status_bytes("VmRSS")
    iterate(mode, loss, optimizer)
    after_first = status_bytes("VmRSS")
    for index in range(1, warmup):  # the last warm-up iteration counts the gradients
        watch.active = index == warmup - 1
        iterate(mode, loss, optimizer)
    watch.remove()
    meter = PeakMeter()
    meter.start()
    for _ in range(iterations):
        iterate(mode, loss, optimizer)
    peak = meter.stop()
    numel = sum(p.numel() for p in params)
    return {
        "params": numel,
        "tensors": len(params),
        "largest_tensor_share": max(p.numel() for p in params) / numel,
        "peak_method": meter.method,
        "rss_over_baseline": {
            "model": after_model - baseline,
            "optimizer": after_optimizer - baseline,
            "first_iteration": after_first - baseline,
            "steady": status_bytes("VmRSS") - baseline,
        },
        "bytes": {
            "peak": peak - baseline,
            "params": tensor_bytes(params),
            "state": state_bytes(optimizer),
            "grads_alive": watch.peak,
        },
    }


def per_param(row):
    """A mode's bytes per parameter: the median peak of its runs and their range, the
    model state and its parts, the code, and what is left to activations and the
    allocator (median peak − model state − code)."""
    runs = row["runs"]
    numel = runs[0]["params"]
    peaks = [run["bytes"]["peak"] / numel for run in runs]
    got = {
        key: statistics.median(run["bytes"][key] for run in runs) / numel
        for key in ("params", "state", "grads_alive")
    }
    got["model_state"] = got["params"] + got["state"] + got["grads_alive"]
    got |= {"peak": statistics.median(peaks), "peak_min": min(peaks), "peak_max": max(peaks)}
    got["code"] = row["code_bytes"] / numel
    got["activations_allocator"] = got["peak"] - got["model_state"] - got["code"]
    return got


# --- iteration time, all modes of one model in one process ----------------------------


def measure_time(modes, kind, settings, rounds):
    """Seconds of whole iterations of each mode in ``modes``, each with its own identical
    copy of the model, taking turns: per round and mode an untimed iteration, then a timed
    one. Modes fastmomentum cannot run yet are returned as skipped."""
    runs, skipped = {}, {}
    for name in modes:
        model, loss = build(kind, settings)
        try:
            runs[name] = (MODES[name], loss, make_optimizer(MODES[name], model.parameters()))
        except Unavailable as error:
            skipped[name] = str(error)
    for run in runs.values():  # compile or load kernels, learn buckets, warm the allocator
        for _ in range(3):
            iterate(*run)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            iterate(*run)
            start = time.perf_counter()
            iterate(*run)
            times[name].append(time.perf_counter() - start)
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    return {"params": numel, "tensors": tensors, "times_s": times, "skipped": skipped}


# --- processes ------------------------------------------------------------------------


def child_main(args):
    """Inside a fresh process: set the threads, import, measure, print one JSON line.

    A real run gives each mode's memory a fresh process, and each model's timing one.
    Under ``--quick``, where the numbers do not matter and process start-ups would
    dominate, one child measures every mode's code then memory, and one the timing of
    both models.
    """
    import numba
    import torch

    import fastmomentum.optim  # noqa: F401  (every mode's process imports the same)

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    models = QUICK_MODELS if args.quick else MODELS
    if args.child == "time":
        result = {m: measure_time(args.modes, *models[m], args.rounds) for m in args.model}
    else:
        result = {name: memory_child_row(args, models, name) for name in args.modes}
    print(json.dumps(result))


def memory_child_row(args, models, name):
    """What a code or memory child reports for mode ``name``: ``code_bytes``, ``run``
    (both under ``--quick``), or ``skipped``."""
    mode, (kind, settings) = MODES[name], models[MEMORY_MODEL]
    row = {}
    try:
        if args.child in ("code", "warm") or args.quick:
            row |= measure_code(mode)
        if args.child == "memory":
            row["run"] = measure_memory(mode, kind, settings, args.warmup, args.iterations)
    except Unavailable as error:
        row = {"skipped": str(error)}
    return row


def spawn(args, child, models, modes):
    """Start ``python -m bench.memory`` as a child measuring ``child`` ("memory",
    "code" or "time") of ``modes`` on ``models``."""
    command = [sys.executable, "-m", "bench.memory", "--child", child, "--model", *models]
    command += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
    command += ["--iterations", str(args.iterations), "--rounds", str(args.rounds)]
    command += ["--quick"] * args.quick + ["--modes", *modes]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def collect(process, what):
    """The JSON a child printed last; its error output if it failed."""
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {process.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def children(args):
    """What each child measures, ``(child, models, modes)``, in order. A real run: one
    child that fills Numba's cache (its numbers are dropped: no measured process should
    compile), each mode's code cost, then ``--repeats`` rounds of each mode's memory
    (every run a fresh process), then each model's iteration times. ``--quick``: two
    children."""
    timed = [name for name in TIMED_MODES if name in args.modes]
    if args.quick:
        timing = [("time", list(MODELS), timed)]
        return [("memory", [MEMORY_MODEL], args.modes)] + timing * bool(timed)
    timing = [("time", [model], timed) for model in MODELS if timed]
    warm = [("warm", [MEMORY_MODEL], args.modes)]
    code = [("code", [MEMORY_MODEL], [name]) for name in args.modes]
    memory = [("memory", [MEMORY_MODEL], [name]) for name in args.modes] * args.repeats
    return warm + (code + memory) * (not args.no_memory) + timing * (not args.no_timing)


def start_children(args):
    """Each child's ``(child, models, modes)`` and its process: under ``--quick`` all
    start at once (nothing that matters is timed), otherwise each starts in
    `collect_children` when the one before has finished."""
    return [(spec, spawn(args, *spec) if args.quick else None) for spec in children(args)]


def collect_children(args, started):
    """``(memory rows, timings)`` from the children, printed as they come. A memory row
    is ``{"code_bytes": ..., "runs": [...]}``, or ``{"skipped": why}``."""
    rows, timings = {}, {}
    for (child, models, modes), process in started:
        result = collect(process or spawn(args, child, models, modes), f"{child} of {modes}")
        if child == "warm":
            continue
        if child == "time":
            timings |= result
            for model, got in result.items():
                print("\n".join(timing_lines(model, got)), flush=True)
            continue
        for name, got in result.items():
            row = rows.setdefault(name, {"runs": []})
            row |= {key: got[key] for key in ("skipped", "code_bytes") if key in got}
            if "run" in got:
                row["runs"].append(got["run"])
                print(memory_line(name, got["run"]), flush=True)
    return rows, timings


# --- reporting ------------------------------------------------------------------------


def memory_line(name, run):
    """One memory run, as it comes."""
    numel, got = run["params"], run["bytes"]
    state = (got["params"] + got["state"] + got["grads_alive"]) / numel
    return f"{name:36} peak {got['peak'] / numel:5.2f} B/param  model state {state:5.2f}"


def timing_summary(result):
    """Per mode: median ms and ratio to the first mode (torch fused)."""
    medians = {name: statistics.median(t) for name, t in result["times_s"].items()}
    reference = next(iter(medians.values()))
    return {name: (m * 1e3, m / reference) for name, m in medians.items()}


def timing_lines(model, result):
    lines = [f"{model} ({result['tensors']} tensors, {result['params']:,} params)"]
    for name, (ms, ratio) in timing_summary(result).items():
        lines.append(f"  {name:20} {ms:9.2f} ms  {ratio:.3f}x torch fused")
    lines += [f"  {name:20} skipped: {why}" for name, why in result["skipped"].items()]
    return lines


def memory_table(report):
    """The memory table's lines: one row per mode, bytes per parameter."""
    lines = [
        "| mode | peak (range) | model state | params | state | grads alive | code "
        "| activations + allocator |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["memory"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | | |")
            continue
        got = per_param(row)
        peak = f"{got['peak']:.2f} ({got['peak_min']:.2f}-{got['peak_max']:.2f})"
        keys = ("model_state", "params", "state", "grads_alive", "code")
        cells = " | ".join(f"{got[key]:.2f}" for key in keys)
        lines.append(f"| {name} | {peak} | {cells} | {got['activations_allocator']:.2f} |")
    return lines


def timing_table(report):
    """The iteration-time table's lines: median per mode, ratio to torch fused."""
    lines = ["| model | tensors | mode | median ms | x torch fused |"]
    lines += ["| --- | ---: | --- | ---: | ---: |"]
    for model, result in report["timing"].items():
        for name, (ms, ratio) in timing_summary(result).items():
            lines.append(f"| {model} | {result['tensors']} | {name} | {ms:.2f} | {ratio:.3f} |")
        for name, why in result["skipped"].items():
            lines.append(f"| {model} | {result['tensors']} | {name} | skipped: {why} | |")
    return lines


def markdown(report):
    """``memory.md``: the memory table, then the iteration-time table."""
    cpu, threads = report["machine"]["cpu"], report["threads"]["torch"]
    lines = [
        f"Measured on {cpu}, {threads} threads, torch {report['versions']['torch']}, "
        f"fastmomentum at {str(report['source']['commit'])[:7]}"
        + (" with edits" if report["source"]["library_edited"] else "")
        + (" (--quick: tiny models, numbers meaningless)." if report["quick"] else "."),
        "",
        f"## Memory: {report['memory_model']} ({report['memory_params']:,} parameters), AdamW",
        "",
        "Bytes per parameter. Peak: resident memory over the baseline after imports, "
        f"{report['iterations']} iterations after {report['warmup']} warm-up ones "
        f"({report['peak_method']}), median of {report['repeats']} fresh processes "
        "(range). Model state: parameters + optimizer state + the most gradient bytes "
        "alive at once, from tensor sizes. Code: kernels and modules loaded on first use, "
        "measured apart on a tiny model (a cost per process). Activations + allocator: "
        "the rest.",
        "",
        *memory_table(report),
        "",
        f"## Iteration time (forward + backward + step), {cpu}, {threads} threads",
        "",
        f"Medians of {report['rounds']} interleaved rounds (each an untimed then a timed "
        "iteration), each mode its own identical copy of the model in one process. Load "
        "average (1, 5, 15 min) before the run {:.1f} {:.1f} {:.1f}, after it {:.1f} {:.1f} "
        "{:.1f}: on a 2-core machine, other work inflates every parallel launch's "
        "barrier, and the steps inside backward launch once per bucket.".format(
            *report["load_average"]["before"], *report["load_average"]["after"]
        ),
        "",
        *timing_table(report),
    ]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Stacked bars of each mode's bytes per parameter; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: per_param(v) for k, v in report["memory"].items() if "skipped" not in v}
    parts = {
        "parameters": "params",
        "optimizer state": "state",
        "gradients alive at once": "grads_alive",
        "code (per process)": "code",
        "activations + allocator": "activations_allocator",
    }
    figure, axis = plt.subplots(figsize=(10, 5.5))
    left = [0.0] * len(rows)
    for label, key in parts.items():
        widths = [max(got[key], 0.0) for got in rows.values()]
        axis.barh(list(rows), widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    for index, got in enumerate(rows.values()):
        spread = [[got["peak"] - got["peak_min"]], [got["peak_max"] - got["peak"]]]
        axis.errorbar(got["peak"], index, xerr=spread, color="black", capsize=3)
        axis.text(got["peak_max"] + 0.2, index, f"{got['peak']:.1f}", va="center")
    for name, target in TARGETS.items():
        if target is None and "torch fused" in rows:
            target = rows["torch fused"]["peak"]  # no more than torch fused's
        if target is not None and name in rows:
            index = list(rows).index(name)
            axis.plot([target] * 2, [index - 0.45, index + 0.45], "r--", linewidth=1.5)
    axis.invert_yaxis()
    axis.set_xlabel("bytes per parameter at the peak, over the baseline after imports")
    axis.set_title(
        f"{report['memory_model']}, AdamW: {report['machine']['cpu']}, "
        f"{report['threads']['torch']} threads (red dashes: issues 19 and 20's targets)",
        fontsize=10,
    )
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


# --- command line ---------------------------------------------------------------------


def parse(argv):
    parser = cli.parser("bench.memory", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 iterations")
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), metavar="MODE",
        help="modes to run (default: all): " + "; ".join(MODES),
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=at_least_two, default=None, help="warm-up iterations (at least 2)"
    )
    parser.add_argument("--iterations", type=cli.positive_int, default=None)
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=None, help="memory runs per mode"
    )
    parser.add_argument("--rounds", type=cli.positive_int, default=None, help="timed turns")
    parser.add_argument("--no-timing", action="store_true", help="memory only")
    parser.add_argument("--no-memory", action="store_true", help="iteration times only")
    parser.add_argument(
        "--child", choices=["warm", "memory", "code", "time"], help=argparse.SUPPRESS
    )
    parser.add_argument("--model", nargs="+", choices=list(MODELS), help=argparse.SUPPRESS)
    cli.add_threads(parser, os.cpu_count())
    cli.add_output(parser, "memory.{json,md,png}")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"warmup": 2 if quick else 3, "iterations": 2 if quick else 6}
    defaults |= {"repeats": 1 if quick else 3, "rounds": 2 if quick else 15}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def at_least_two(text):
    """``argparse`` type: an integer of at least 2 (the first iteration is never steady:
    a step in backward learns its buckets there)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def source_version():
    """The commit measured, and whether the library's files differ from it (a run from
    a shared checkout may pick up someone's unfinished edit)."""

    def git(*command):
        try:
            run = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return ""
        return run.stdout.strip() if run.returncode == 0 else ""

    edited = git("status", "--porcelain", "--", "fastmomentum", "kernels")
    return {"commit": git("rev-parse", "HEAD") or None, "library_edited": bool(edited)}


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child_main(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numba
    import torch

    from .report import machine_facts

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = start_children(args)
    facts = machine_facts(args.threads)
    memory, timing = collect_children(args, started)
    measured = [row["runs"][0] for row in memory.values() if "skipped" not in row]
    report = {
        **facts,
        "quick": args.quick,
        "source": source_version(),
        # other work on the machine: 1, 5 and 15-minute load averages before and after
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "memory_model": MEMORY_MODEL,
        "memory_params": measured[0]["params"] if measured else 0,
        "peak_method": measured[0]["peak_method"] if measured else None,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "targets_bytes_per_param": TARGETS,
        "memory": memory,
        "memory_per_param": {
            name: per_param(row) for name, row in memory.items() if "skipped" not in row
        },
        "timing": timing,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "memory.json").write_text(json.dumps(report, indent=1))
    (args.output / "memory.md").write_text(markdown(report))
    if not plot(report, args.output / "memory.png"):
        print("matplotlib is not installed: no memory.png")
    print(f"\nresults in {args.output}")


if __name__ == "__main__":
    main()
