"""Style, checked with the suite: ruff's lint over src, tests, benchmarks and docs/hooks (rules in
pyproject.toml).

The layer contract is tests/test_layers.py. ruff comes with the test extra (pinned in constraints.txt);
without it this test skips.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    pytest.importorskip("ruff")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks", "docs/hooks"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
