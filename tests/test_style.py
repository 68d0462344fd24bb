"""Style, checked with the suite: ruff's lint and its formatter over src, tests, benchmarks and docs/hooks
(rules and line length in pyproject.toml; `ruff format src tests benchmarks docs/hooks` formats).

The layer contract is tests/test_layers.py. ruff comes with the test extra (pinned in constraints.txt);
without it this test skips.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


STYLED = ("src", "tests", "benchmarks", "docs/hooks")


def test_ruff_check_is_clean():
    pytest.importorskip("ruff")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *STYLED], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_is_clean():
    pytest.importorskip("ruff")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *STYLED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        "run `ruff format src tests benchmarks docs/hooks`:\n" + result.stdout[-4000:] + result.stderr[-2000:]
    )
