"""`lorakit compare`: several methods, one table, JSON/CSV/HTML; failures per row; a second run reuses."""

from __future__ import annotations

import base64
import csv
import json
import os
import re

import pytest
from tiny_lm import save_tiny_llama, write_jsonl

from lorakit import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = str(save_tiny_llama(root / "model"))
    data = write_jsonl(root / "pc.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1}"} for i in range(24)])
    return root, model, str(data)


FAIL_HOOK = """
import os
if os.environ.get("LORAKIT_TEST_FAIL_METHOD"):
    from lorakit.train import loop
    from lorakit.train.errors import LorakitError
    _set_up = loop.set_up

    def set_up(cfg, *args, **kwargs):
        if cfg.method == os.environ["LORAKIT_TEST_FAIL_METHOD"]:
            raise LorakitError("simulated failure of this method")
        return _set_up(cfg, *args, **kwargs)

    loop.set_up = set_up
"""


def test_compare_writes_a_table_json_csv_and_an_offline_html(setup, capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    root, model, data = setup
    (tmp_path / "sitecustomize.py").write_text(FAIL_HOOK)  # each method's run is its own process: fail one there
    # added to the caller's path (which may name the lorakit under test), not replacing it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LORAKIT_TEST_FAIL_METHOD", "adalora")
    argv = ["compare", "--methods", "lora,dora,adalora", "--model", model, "--data", data, "--steps", "3", "--batch-size", "4",
            "--out-dir", str(root / "runs"), "--name", "cmp", "--no-progress"]
    code = cli.main(argv)
    out = capsys.readouterr().out
    directory = root / "runs" / "cmp"
    records = json.loads((directory / "compare.json").read_text())["methods"]
    assert [r["method"] for r in records] == ["lora", "dora", "adalora"]
    # a method that fails gets its reason in its row; the others ran
    assert records[2]["status"] == "failed" and records[2]["reason"] == "simulated failure of this method" and code == 2
    assert all(r["status"] == "done" and r["trainable_params"] > 0 and r["step_vs_limit"] > 0 for r in records[:2])
    assert re.search(r"^lora\s+\S+", out, re.M) and "adalora  failed:" in out
    with open(directory / "compare.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["lora", "dora", "adalora"]
    page = (directory / "compare.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<table>" in page and "http://" not in page and "https://" not in page

    # the same command again: finished methods are reused, not trained again; the failed one runs again
    monkeypatch.delenv("LORAKIT_TEST_FAIL_METHOD")
    before = (directory / "lora" / "report.json").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (directory / "lora" / "report.json").stat().st_mtime_ns == before
    assert "lora: already trained" in capsys.readouterr().err
    assert json.loads((directory / "compare.json").read_text())["methods"][2]["status"] == "done"


def test_compare_refuses_a_directory_with_other_settings_and_unknown_methods(setup, capsys):
    root, model, data = setup
    base = ["compare", "--model", model, "--data", data, "--steps", "2", "--batch-size", "4", "--out-dir", str(root / "runs2"),
            "--name", "c", "--no-progress", "--no-html"]
    assert cli.main(base + ["--methods", "lora"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--methods", "lora", "--lr", "0.5"]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err
    assert cli.main(base + ["--methods", "lora,nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
