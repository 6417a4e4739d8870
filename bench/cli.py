"""What every ``python -m bench…`` command shares: its argument parser and where it writes.

Runs write under ``bench/out/`` (untracked); the committed results in ``bench/results/``
change only when a run is given ``--output bench/results``.
"""

import argparse
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Where runs write by default: ignored by git (``bench/out/.gitignore``).
OUT = HERE / "out"
#: The committed results, quoted by the README and bench/NOTES.md.
RESULTS = HERE / "results"


def parser(module, doc):
    """An argument parser for ``python -m <module>`` whose help text is ``doc`` (the
    module's docstring, usage examples included)."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text):
    """``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads(parser, default):
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default,
        help="threads for torch, Numba and OpenMP (default: %(default)s, the CPU count)",
    )


def add_output(parser, what):
    parser.add_argument(
        "--output",
        type=Path,
        default=OUT,
        help=f"folder for {what} (default: bench/out, untracked; "
        "--output bench/results replaces the committed results)",
    )


def cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows: every
    report names the machine it was measured on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
