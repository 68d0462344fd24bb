"""The sample outputs of README.md and docs/*.md come from benchmarks/readme_samples.py, which runs their
commands: every sample it knows has its place in one of those pages (wherever it moves), every marker
names a known sample, and regenerating one replaces its blocks only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_samples  # noqa: E402  (benchmarks/ is not a package)


def test_every_sample_has_its_block_in_the_readme_or_the_docs():
    found = readme_samples.places(readme_samples.default_pages(), readme_samples.SAMPLES)  # stops on a stray marker
    for sample in readme_samples.SAMPLES:
        for page in found[sample.name]:
            text = page.read_text()
            assert readme_samples.replace_sample(text, sample.name, ["new line"]).count("new line") == text.count(
                f"<!-- sample: {sample.name} -->"), (page, sample.name)


def test_replacing_a_sample_leaves_the_rest():
    text = "a\n<!-- sample: x -->\n```\nold 1\nold 2\n```\n<!-- /sample -->\nb\n<!-- sample: y -->\n```\nkeep\n```\n<!-- /sample -->\n"
    new = readme_samples.replace_sample(text, "x", ["new 1"])
    assert new == text.replace("old 1\nold 2\n", "new 1\n")
    with pytest.raises(SystemExit, match="no sample 'z'"):
        readme_samples.replace_sample(text, "z", [])
    indented = "- item\n\n  <!--  sample: x -->\n  ~~~text\n  old\n  ~~~\n  <!-- /sample -->\n"  # in a list, another fence
    assert readme_samples.replace_sample(indented, "x", ["new"]) == indented.replace("  old\n", "new\n")
    assert readme_samples.sample_names("Write `<!-- sample: NAME -->` above the block.\n" + text) == ["x", "y"]


@pytest.fixture
def pages(tmp_path, monkeypatch):
    """A README and a docs page, the sst2 samples moved into the docs page; running a sample gives
    its name and the runs it saw, without running lorakit."""
    block = "<!-- sample: {} -->\n```\nold\n```\n<!-- /sample -->\n"
    readme = tmp_path / "README.md"
    readme.write_text("# lorakit\n\nSee docs/data.md.\n")
    data = tmp_path / "data.md"
    data.write_text("# Data\n\n" + block.format("sst2-train") + "\ntext\n\n" + block.format("sst2-inspect") + "\nend\n")
    ran = []
    monkeypatch.setattr(readme_samples, "run", lambda sample, runs: ran.append(sample.name) or [f"output of {sample.name}"])
    return readme, data, ran


def test_samples_moved_into_a_docs_page_are_found_and_regenerated_there(pages):
    readme, data, ran = pages
    before = readme.read_text()
    assert readme_samples.main([str(readme), str(data)]) == 0
    assert ran == ["sst2-train", "sst2-inspect"]  # in order: inspect reads the run train wrote
    assert readme.read_text() == before
    assert data.read_text() == ("# Data\n\n<!-- sample: sst2-train -->\n```\noutput of sst2-train\n```\n<!-- /sample -->\n\ntext\n\n"
                                "<!-- sample: sst2-inspect -->\n```\noutput of sst2-inspect\n```\n<!-- /sample -->\n\nend\n")
    assert sorted(p.name for p in data.parent.iterdir()) == ["README.md", "data.md"]  # no temporary file left


def test_a_page_with_a_stray_or_open_marker_stops_before_anything_runs(pages):
    readme, data, ran = pages
    readme.write_text("<!-- sample: sst2-trian -->\n```\nx\n```\n<!-- /sample -->\n")
    with pytest.raises(SystemExit, match=r"README\.md: no sample is named 'sst2-trian' \(known: sst2-inspect, sst2-train\)"):
        readme_samples.main([str(readme), str(data)])
    readme.write_text("<!-- sample: sst2-train -->\n```\nx\n")
    with pytest.raises(SystemExit, match=r"the sample 'sst2-train' is not a fenced block closed by <!-- /sample -->"):
        readme_samples.main([str(readme), str(data)])
    readme.write_text("# lorakit\n")
    with pytest.raises(SystemExit, match=r"no block for sample\(s\) sst2-train, sst2-inspect in .*README\.md"):
        readme_samples.places([readme], readme_samples.SAMPLES)
    assert ran == []


def test_the_inspect_sample_keeps_the_summary_with_the_grid_cut():
    output = ["adapter (lora) on minilm", "relative change ||ΔW|| / ||W0|| (x 1e-3) of 37 adapted modules:",
              "layer    query     key", "    0    41.58   44.71", "    1    1.00   2.00", "    5   105.22   61.11",
              "bert.pooler.dense: 261.10", "", "largest changes: ...", "effective rank of ΔW: mean 5.64",
              "magnitude vs direction change per module (DoRA's view): mean ΔM 4.492e-03", "report: x.html"]
    assert readme_samples.inspect_summary(output) == [
        output[1], output[2], output[3], "  ...", output[5], "bert.pooler.dense: 261.10", output[9], output[10]]


def test_the_train_sample_leaves_out_timings():
    output = ["loading", "data columns: label=label, text=sentence", "step 10 loss 0.7 (3.2 s)",
              "after: accuracy 80.3%, f1 80.2%, mcc 0.6063, eval_loss 0.4296 (36 s)", "accuracy (held-out)   53.2% -> 80.3%",
              "time: 86 s"]
    assert readme_samples.SAMPLES[0].keep(output) == [output[1], "after: accuracy 80.3%, f1 80.2%, mcc 0.6063, eval_loss 0.4296",
                                                      output[4]]
