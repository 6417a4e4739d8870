"""What each precision mode costs in accuracy: the same small models trained side by side.

Two tasks, a few hundred Adam steps each, every mode from the same initial weights and
the same batches:

- regression: a student MLP (8-32-1) fitted to a random teacher MLP, held-out MSE;
- classifier: an MLP (20-64-10) on ten Gaussian clusters, held-out cross-entropy and
  accuracy.

Modes: float32 parameters with float32 state (the reference), with bfloat16 state
(``state_dtype``), with block-wise 8-bit state (``state_dtype="int8_blockwise"``),
bfloat16 parameters computing in float32 with one rounding per stored value (torch's
fused arithmetic), and bfloat16 parameters with float32 master weights. The model's
forward and backward run in its parameters' dtype.

    python -m bench.precision [--steps N] [--output DIR]

Writes ``precision.{json,md}`` to ``bench/out/`` (``--output bench/results`` for the
committed run); ``tests/test_precision_state.py`` asserts the tolerances on fewer steps.
"""

import json
import sys

import torch
from torch import nn

import fastmomentum

from . import cli

#: name -> (parameter dtype, optimizer options)
MODES = {
    "fp32 params, fp32 state": (torch.float32, {}),
    "fp32 params, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32 params, 8-bit state": (torch.float32, {"state_dtype": "int8_blockwise"}),
    "bf16 params": (torch.bfloat16, {}),
    "bf16 params, fp32 master": (torch.bfloat16, {"master_weights": True}),
}


def _mlp(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for inputs, outputs in zip(sizes, sizes[1:]):
        layers += [nn.Linear(inputs, outputs), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def regression(dtype, options, steps, lr=3e-3):
    """Held-out MSE of a student fitted to a random teacher (inputs and targets in
    float32, cast to the student's dtype)."""
    teacher, student = _mlp([8, 32, 1], seed=0), _mlp([8, 32, 1], seed=1).to(dtype)
    optimizer = fastmomentum.Adam(student.parameters(), lr=lr, **options)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        inputs = torch.randn(64, 8, generator=generator)
        with torch.no_grad():
            targets = teacher(inputs)
        loss = nn.functional.mse_loss(student(inputs.to(dtype)).float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs = torch.randn(4096, 8, generator=generator)
    with torch.no_grad():
        predictions = student(inputs.to(dtype)).float()
        return {"loss": nn.functional.mse_loss(predictions, teacher(inputs)).item()}


def classifier(dtype, options, steps, lr=3e-3):
    """Held-out cross-entropy and accuracy on ten Gaussian clusters in 20 dimensions."""
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(10, 20, generator=generator) * 1.2

    def batch(size):
        labels = torch.randint(0, 10, (size,), generator=generator)
        return centres[labels] + torch.randn(size, 20, generator=generator), labels

    model = _mlp([20, 64, 10], seed=4).to(dtype)
    optimizer = fastmomentum.Adam(model.parameters(), lr=lr, **options)
    for _ in range(steps):
        inputs, labels = batch(128)
        loss = nn.functional.cross_entropy(model(inputs.to(dtype)).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, labels = batch(8192)
    with torch.no_grad():
        logits = model(inputs.to(dtype)).float()
    return {
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }


TASKS = {"regression": regression, "classifier": classifier}


def study(steps):
    """Per task and mode, the held-out results, and each loss relative to float32's."""
    results = {}
    for task, train in TASKS.items():
        rows = {mode: train(dtype, options, steps) for mode, (dtype, options) in MODES.items()}
        reference = rows["fp32 params, fp32 state"]["loss"]
        for row in rows.values():
            row["loss_vs_fp32"] = row["loss"] / reference
        results[task] = rows
    return results


def markdown(results, steps):
    lines = [
        f"Adam, {steps} steps, same initial weights and batches for every mode.",
        "",
        "| task | mode | held-out loss | × fp32 | accuracy |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for task, rows in results.items():
        for mode, row in rows.items():
            accuracy = f"{row['accuracy']:.3f}" if "accuracy" in row else "-"
            lines.append(
                f"| {task} | {mode} | {row['loss']:.4g} | {row['loss_vs_fp32']:.3f} | {accuracy} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = cli.parser("bench.precision", __doc__)
    parser.add_argument("--steps", type=cli.positive_int, default=300, help="Adam steps per run")
    cli.add_output(parser, "precision.{json,md}")
    args = parser.parse_args(argv)
    results = study(args.steps)
    table = markdown(results, args.steps)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "precision.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "precision.md").write_text(table)
    print(f"wrote {args.output / 'precision.json'} and precision.md", file=sys.stderr)


if __name__ == "__main__":
    main()
