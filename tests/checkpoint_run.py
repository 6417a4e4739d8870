"""One training run, whole or in two halves with a kill between, for test_checkpoints.

    python -m tests.checkpoint_run whole|first|second FOLDER

``first`` trains the first half of every case, saves a checkpoint (model and optimizer
state dicts through ``torch.save``) and kills its own process with SIGKILL; ``second``
starts afresh from those files and trains the second half. ``whole`` and ``second``
save the final parameters for comparison.
"""

import os
import signal
import sys
from pathlib import Path

import torch

import fastmomentum

from .models import make_model, train

CASES = {
    "sgd": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": ("Adam", {"lr": 1e-2, "amsgrad": True}),
    "adamw": ("AdamW", {"lr": 1e-2}),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STEPS, HALF = 20, 10


def run(mode, folder):
    for case, (name, options) in CASES.items():
        for dtype_name, dtype in DTYPES.items():
            tag = f"{case}-{dtype_name}"
            model = make_model(dtype)
            optimizer = getattr(fastmomentum, name)(model.parameters(), **options)
            if mode == "second":
                checkpoint = torch.load(folder / f"{tag}.ckpt")
                model.load_state_dict(checkpoint["model"])
                optimizer.load_state_dict(checkpoint["optimizer"])
            end, first = {"whole": (STEPS, 0), "first": (HALF, 0), "second": (STEPS, HALF)}[mode]
            train(model, optimizer, end, dtype, first=first)
            if mode == "first":
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(state, folder / f"{tag}.ckpt")
            else:
                torch.save([p.detach() for p in model.parameters()], folder / f"{tag}.{mode}")
    if mode == "first":
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
