"""`python3 -m pytest --quick`: a quick local run leaves out the fuzz, distributed, llama.cpp, Chromium and
integration tests (tests/conftest.py), and only those; the plain command (CI's) collects them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One file of each kind the quick run leaves out, and files that mix such tests with ordinary ones.
FILES = [
    "tests/test_fuzz.py",
    "tests/train/test_distributed.py",
    "tests/test_batch_splits.py",
    "tests/test_reports_in_chromium.py",
    "tests/test_integration_models.py",
    "tests/test_llama_cpp.py",
]


def collected(*options: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *options, *FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_quick_deselects_the_slow_kinds_and_nothing_else():
    everything = collected()
    marked = collected("-m", "fuzz or distributed or llama_cpp or chromium or integration")
    quick = collected("--quick")
    assert quick == everything - marked
    for name in (
        "test_fuzz.py",
        "test_distributed.py::test_two_processes",
        "test_batch_splits.py::test_two_processes",
        "test_reports_in_chromium.py",
        "test_integration_models.py",
    ):
        assert any(name in test for test in marked), f"nothing of {name} is marked"
        assert not any(name in test for test in quick), f"--quick kept {name}"
    # the single-process tests beside them stay in the quick run
    assert any("test_distributed.py::test_repeated_blocks_are_the_decoder_layers" in test for test in quick)
    assert any(
        "test_batch_splits.py::test_one_step_is_the_same_whatever_the_micro_batch_split" in test for test in quick
    )
