"""``python -m bench``: the benchmark report (see bench/report.py)."""

from .report import main

main()
