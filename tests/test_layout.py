"""Limits the repository keeps (issue 21): the README is a user's page of at most 250
lines (the rest is in docs/), and no test file is over 500 lines (split by topic)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move details to docs/"


def test_no_test_file_is_over_500_lines():
    long = {
        path.name: count
        for path in sorted((ROOT / "tests").glob("*.py"))
        if (count := path.read_text().count("\n")) > 500
    }
    assert not long, f"split these test files by topic: {long}"
