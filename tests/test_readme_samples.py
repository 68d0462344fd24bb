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
                f"<!-- sample: {sample.name} -->"
            ), (page, sample.name)


def test_replacing_a_sample_leaves_the_rest():
    text = "a\n<!-- sample: x -->\n```\nold 1\nold 2\n```\n<!-- /sample -->\nb\n<!-- sample: y -->\n```\nkeep\n```\n<!-- /sample -->\n"
    new = readme_samples.replace_sample(text, "x", ["new 1"])
    assert new == text.replace("old 1\nold 2\n", "new 1\n")
    with pytest.raises(SystemExit, match="no sample 'z'"):
        readme_samples.replace_sample(text, "z", [])
    indented = (
        "- item\n\n  <!--  sample: x -->\n  ~~~text\n  old\n  ~~~\n  <!-- /sample -->\n"  # in a list, another fence
    )
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
    monkeypatch.setattr(
        readme_samples, "run", lambda sample, runs: ran.append(sample.name) or [f"output of {sample.name}"]
    )
    return readme, data, ran


def test_samples_moved_into_a_docs_page_are_found_and_regenerated_there(pages):
    readme, data, ran = pages
    before = readme.read_text()
    assert readme_samples.main([str(readme), str(data)]) == 0
    assert ran == ["sst2-train", "sst2-inspect"]  # in order: inspect reads the run train wrote
    assert readme.read_text() == before
    assert data.read_text() == (
        "# Data\n\n<!-- sample: sst2-train -->\n```\noutput of sst2-train\n```\n<!-- /sample -->\n\ntext\n\n"
        "<!-- sample: sst2-inspect -->\n```\noutput of sst2-inspect\n```\n<!-- /sample -->\n\nend\n"
    )
    assert sorted(p.name for p in data.parent.iterdir()) == ["README.md", "data.md"]  # no temporary file left


def test_a_page_edited_while_the_samples_ran_is_not_overwritten(pages, monkeypatch):
    readme, data, ran = pages
    edited = data.read_text() + "an edit made meanwhile\n"

    def run_and_edit(sample, runs):
        data.write_text(edited)  # the docs writer saves the page while the sample runs
        return ["new"]

    monkeypatch.setattr(readme_samples, "run", run_and_edit)
    with pytest.raises(SystemExit, match=r"data\.md changed while the samples ran; nothing written to it"):
        readme_samples.main([str(readme), str(data)])
    assert data.read_text() == edited


def test_a_marker_of_a_block_made_elsewhere_is_left_as_written(pages):
    readme, data, ran = pages
    block = "<!-- sample: sst2-lora-drop-inspect -->\n```\nby reproduce.py\n```\n<!-- /sample -->\n"
    readme.write_text(block)
    assert readme_samples.main([str(readme), str(data)]) == 0
    assert readme.read_text() == block and ran == ["sst2-train", "sst2-inspect"]


def test_a_page_with_a_stray_or_open_marker_stops_before_anything_runs(pages):
    readme, data, ran = pages
    readme.write_text("<!-- sample: sst2-trian -->\n```\nx\n```\n<!-- /sample -->\n")
    with pytest.raises(
        SystemExit, match=r"README\.md: no sample is named 'sst2-trian' \(known: sst2-inspect, sst2-train\)"
    ):
        readme_samples.main([str(readme), str(data)])
    readme.write_text("<!-- sample: sst2-train -->\n```\nx\n")
    with pytest.raises(SystemExit, match=r"the sample 'sst2-train' is not a fenced block closed by <!-- /sample -->"):
        readme_samples.main([str(readme), str(data)])
    readme.write_text("# lorakit\n")
    with pytest.raises(
        SystemExit, match=r"no block for sample\(s\) default-train, sst2-train, sst2-inspect in .*README\.md"
    ):
        readme_samples.places([readme], readme_samples.SAMPLES)
    assert ran == []


def test_the_inspect_sample_keeps_the_summary_and_the_whole_grid():
    output = [
        "adapter (lora) on minilm",
        "relative change ||ΔW|| / ||W0|| (x 1e-3) of 37 adapted modules:",
        "layer    query     key",
        "    0    41.58   44.71",
        "    1    1.00   2.00",
        "    5   105.22   61.11",
        "bert.pooler.dense: 261.10",
        "",
        "largest changes: a 2.6e-01, b 1.2e-01, c 1.1e-01",
        "effective rank of ΔW: mean 5.64",
        "magnitude vs direction change per module (DoRA's view): mean ΔM 4.492e-03",
        "report: x.html",
    ]
    assert (
        readme_samples.inspect_summary(output)
        == output[1:7] + ["largest changes: a 2.6e-01, b 1.2e-01, ..."] + output[9:11]
    )


def test_the_default_run_sample_is_its_summary():
    output = [
        "loading",
        "step 100 loss 0.01",
        "method                  lora",
        "trainable params        2,442,240",
        "final train loss        0.0089",
        "exact_match (held-out)  0.0% -> 100.0%",
        "eval loss               5.0755 -> 0.0062",
        "saved to runs/default",
    ]
    assert readme_samples.run_summary(output) == output[2:7]


def test_the_train_sample_leaves_out_timings():
    output = [
        "loading",
        "data columns: label=label, text=sentence",
        "step 10 loss 0.7 (3.2 s)",
        "after: accuracy 80.3%, f1 80.2%, mcc 0.6063, eval_loss 0.4296 (36 s)",
        "accuracy (held-out)   53.2% -> 80.3%",
        "time: 86 s",
    ]
    train = next(s for s in readme_samples.SAMPLES if s.name == "sst2-train")
    assert train.keep(output) == [output[1], "after: accuracy 80.3%, f1 80.2%, mcc 0.6063, eval_loss 0.4296", output[4]]
