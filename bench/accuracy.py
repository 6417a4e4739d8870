"""Does low-precision training keep float32's quality? A character-level language model
trained on Python's own standard library, in every precision mode, from one start.

    python -m bench.accuracy                           # peak lr 3e-3 and 3e-4: ~10 min, 2 cores
    python -m bench.accuracy --output bench/results    # replace the committed results
    python -m bench.accuracy --quick                   # a tiny run, seconds (the test)

The text is the source of the standard library's top-level modules (sorted by name, the
first ``--characters``), held out: its last tenth. The model is a small pre-LayerNorm
transformer over bytes. Every mode starts from the same float32 weights (cast to the
mode's dtype) and sees the same batches; each trains with `fastmomentum.AdamW`:

- ``float32``: the reference;
- ``bf16-state`` / ``int8-state``: float32 parameters, the moments in bfloat16 / 8 bits;
- ``bf16``: bfloat16 parameters alone (small updates lost to rounding: the failure mode
  the others fix);
- ``bf16-master``: bfloat16 parameters with a float32 master copy;
- ``bf16-stochastic`` / ``bf16-kahan``: bfloat16 parameters stored with stochastic
  rounding / with a Kahan compensation buffer, when the optimizer has those options;
- ``bf16-stochastic-int8``: both savings at once, the fewest bytes (about 4 a
  parameter of model state with the step in backward);
- each again with ``step_in_backward=True`` (``…+backward``), which must be the same
  numbers as without.

Reported: held-out loss (cross-entropy, nats per byte) along the run and at its end, and
each mode's final held-out loss relative to float32's. Results go to
``accuracy.{json,md,png}`` in ``bench/out/`` or the folder ``--output`` names.
"""

import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import fastmomentum

from . import cli

#: name -> (parameter dtype, AdamW options beyond the shared ones)
MODES = {
    "float32": (torch.float32, {}),
    "bf16-state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "int8-state": (torch.float32, {"state_dtype": "int8_blockwise"}),
    "bf16": (torch.bfloat16, {}),
    "bf16-master": (torch.bfloat16, {"master_weights": True}),
    "bf16-stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16-kahan": (torch.bfloat16, {"kahan_sum": True}),
    "bf16-stochastic-int8": (
        torch.bfloat16,
        {"stochastic_rounding": True, "state_dtype": "int8_blockwise"},
    ),
}
#: The mode whose failure the others fix: not held to float32's quality.
UNCOMPENSATED = "bf16"


class Config:
    """The size of a run."""

    def __init__(self, quick=False, steps=None, characters=None, lr=3e-3):
        self.width, self.layers, self.heads = (32, 1, 2) if quick else (128, 2, 4)
        self.context, self.batch = (32, 8) if quick else (64, 16)
        self.steps = steps or (40 if quick else 400)
        self.characters = characters or (200_000 if quick else 2_000_000)
        self.evaluate_every = max(1, self.steps // (5 if quick else 20))
        self.lr, self.weight_decay = lr, 0.01
        self.held_out_batches = 2 if quick else 16


def standard_library_text(characters):
    """The bytes of the standard library's top-level modules, sorted by file name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= characters:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:characters]), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x, mask):
        h = self.attention_norm(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class CharModel(nn.Module):
    """A byte-level pre-LayerNorm transformer."""

    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(256, config.width)
        self.position = nn.Parameter(torch.randn(config.context, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, 256)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.position[:length]
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def batches(text, config, count, seed):
    """``count`` (inputs, targets) windows of ``text``, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(
        0, len(text) - config.context - 1, (count, config.batch), generator=generator
    )
    offsets = torch.arange(config.context + 1)
    for row in starts:
        windows = text[row[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


def loss_of(model, inputs, targets):
    logits = model(inputs).float()
    return nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


@torch.no_grad()
def held_out_loss(model, held_out, config):
    losses = [
        loss_of(model, x, y).item()
        for x, y in batches(held_out, config, config.held_out_batches, 99)
    ]
    return sum(losses) / len(losses)


def train(mode, in_backward, text, held_out, config, start):
    """Train one mode from ``start`` (a float32 state dict); its held-out losses, or the
    reason it cannot run here (an option this version does not have)."""
    dtype, options = MODES[mode]
    torch.manual_seed(0)
    model = CharModel(config)
    model.load_state_dict(start)
    model.to(dtype)
    try:
        optimizer = fastmomentum.AdamW(
            model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            step_in_backward=in_backward,
            **options,
        )
    except (TypeError, ValueError) as error:
        return {"skipped": str(error)}
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    curve, began = [], time.perf_counter()
    for step, (inputs, targets) in enumerate(batches(text, config, config.steps, 1)):
        loss_of(model, inputs, targets).backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad()
        schedule.step()
        if (step + 1) % config.evaluate_every == 0 or step + 1 == config.steps:
            curve.append((step + 1, held_out_loss(model, held_out, config)))
    return {
        "curve": curve,
        "final": curve[-1][1],
        "seconds": time.perf_counter() - began,
        "parameters": [p.detach().float().clone() for p in model.parameters()],
    }


def study(config):
    """Every mode, without and with step in backward; the report."""
    torch.manual_seed(0)
    everything = standard_library_text(config.characters)
    split = len(everything) * 9 // 10
    text, held_out = everything[:split], everything[split:]
    start = CharModel(config).state_dict()
    runs = {}
    for mode in MODES:
        for in_backward in (False, True):
            name = mode + ("+backward" if in_backward else "")
            runs[name] = train(mode, in_backward, text, held_out, config, start)
    reference = runs["float32"]["final"]
    report = {"config": vars(config), "characters": len(everything), "modes": {}}
    for name, run in runs.items():
        if "skipped" in run:
            report["modes"][name] = {"skipped": run["skipped"]}
            continue
        ordinary = runs[name.removesuffix("+backward")]
        same = all(torch.equal(a, b) for a, b in zip(run["parameters"], ordinary["parameters"]))
        report["modes"][name] = {
            "final": run["final"],
            "relative": run["final"] / reference - 1,
            "curve": run["curve"],
            "seconds": run["seconds"],
            "same_as_ordinary_loop": same,
        }
    return report


def markdown(reports, machine):
    """The tables of the studies ``reports`` (one per peak learning rate)."""
    lines = [
        "# Accuracy: a byte-level transformer on the standard library's source",
        "",
        f"Measured on {machine} (the seconds are whole runs, 2 threads, a shared machine).",
    ]
    for report in reports:
        lines += ["", *study_table(report)]
    return "\n".join(lines) + "\n"


def study_table(report):
    config = report["config"]
    lines = [
        f"## Peak learning rate {config['lr']:g}",
        "",
        f"{config['steps']} AdamW steps (lr {config['lr']}, one-cycle), width {config['width']}, "
        f"{config['layers']} layers, context {config['context']}, batch {config['batch']}; "
        f"{report['characters']:,} bytes, the last tenth held out. Every mode from the same "
        "float32 start and batches.",
        "",
        "| mode | held-out loss | vs float32 | = ordinary loop | seconds |",
        "|---|---:|---:|:---:|---:|",
    ]
    for name, mode in report["modes"].items():
        if "skipped" in mode:
            lines.append(f"| {name} | — | — | — | skipped: {mode['skipped'][:60]} |")
            continue
        same = "yes" if mode["same_as_ordinary_loop"] else "**no**"
        lines.append(
            f"| {name} | {mode['final']:.4f} | {100 * mode['relative']:+.2f}% | {same} "
            f"| {mode['seconds']:.1f} |"
        )
    return lines


def plot(reports, path):
    """Per peak learning rate: the held-out loss of each mode along the run, and below
    it each mode's difference from float32's, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(
        2, len(reports), figsize=(7 * len(reports), 8), squeeze=False, sharex="col"
    )
    for column, report in enumerate(reports):
        losses_axis, relative_axis = axes[0][column], axes[1][column]
        reference = dict(report["modes"]["float32"]["curve"])
        for name, mode in report["modes"].items():
            if "curve" not in mode or name.endswith("+backward"):
                continue  # the same numbers as without
            steps, losses = zip(*mode["curve"])
            style = {"linestyle": "--" if name == UNCOMPENSATED else "-", "label": name}
            losses_axis.plot(steps, losses, **style)
            relative = [100 * (loss / reference[step] - 1) for step, loss in mode["curve"]]
            relative_axis.plot(steps, relative, **style)
        losses_axis.set_ylabel("held-out loss (nats per byte)")
        losses_axis.set_title(f"peak lr {report['config']['lr']:g}")
        relative_axis.axhline(2, color="grey", linewidth=0.8, linestyle=":")
        relative_axis.axhline(-2, color="grey", linewidth=0.8, linestyle=":")
        relative_axis.set_ylabel("held-out loss vs float32 (%)")
        relative_axis.set_xlabel("step")
        losses_axis.legend(fontsize=8)
    figure.suptitle("AdamW precision modes, byte-level transformer on the stdlib")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv=None):
    parser = cli.parser("bench.accuracy", __doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model and run")
    parser.add_argument("--steps", type=cli.positive_int, default=None)
    parser.add_argument(
        "--lr", type=float, nargs="+", default=None,
        help="peak learning rates, one study each (default 3e-3 and 3e-4; --quick: 3e-3)",
    )  # fmt: skip
    cli.add_output(parser, "accuracy.{json,md,png}")
    arguments = parser.parse_args(argv)
    rates = arguments.lr or ([3e-3] if arguments.quick else [3e-3, 3e-4])
    reports = [study(Config(arguments.quick, arguments.steps, lr=lr)) for lr in rates]
    machine = cli.cpu_model()
    arguments.output.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine, "studies": reports}
    (arguments.output / "accuracy.json").write_text(json.dumps(document, indent=1))
    (arguments.output / "accuracy.md").write_text(markdown(reports, machine))
    try:
        plot(reports, arguments.output / "accuracy.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(markdown(reports, machine))
    finite = all(math.isfinite(m.get("final", 0.0)) for r in reports for m in r["modes"].values())
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
