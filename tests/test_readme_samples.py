"""README's sample outputs come from benchmarks/readme_samples.py, which runs their commands: every
sample it knows has its place in the README, and regenerating one replaces that block only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_samples  # noqa: E402  (benchmarks/ is not a package)


def test_every_sample_has_its_block_in_the_readme():
    text = (ROOT / "README.md").read_text()
    for sample in readme_samples.SAMPLES:
        assert f"<!-- sample: {sample.name} -->\n```" in text, sample.name
        assert readme_samples.replace_sample(text, sample.name, ["new line"]).count("new line") == 1


def test_replacing_a_sample_leaves_the_rest():
    text = "a\n<!-- sample: x -->\n```\nold 1\nold 2\n```\n<!-- /sample -->\nb\n<!-- sample: y -->\n```\nkeep\n```\n<!-- /sample -->\n"
    new = readme_samples.replace_sample(text, "x", ["new 1"])
    assert new == text.replace("old 1\nold 2\n", "new 1\n")
    with pytest.raises(SystemExit, match="no sample 'z'"):
        readme_samples.replace_sample(text, "z", [])


def test_the_inspect_sample_keeps_the_summary_with_the_grid_cut():
    output = ["adapter (lora) on minilm", "relative change ||ΔW|| / ||W0|| (x 1e-3) of 37 adapted modules:",
              "layer    query     key", "    0    41.58   44.71", "    1    1.00   2.00", "    5   105.22   61.11",
              "bert.pooler.dense: 261.10", "", "largest changes: ...", "effective rank of ΔW: mean 5.64",
              "magnitude vs direction change per module (DoRA's view): mean ΔM 4.492e-03", "report: x.html"]
    assert readme_samples.inspect_summary(output) == [
        output[1], output[2], output[3], "  ...", output[5], "bert.pooler.dense: 261.10", output[9], output[10]]
