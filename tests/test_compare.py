"""`lorakit compare`: several methods, one table, JSON/CSV/HTML; failures per row; a second run reuses."""

from __future__ import annotations

import base64
import csv
import json
import os
import re

import pytest

from lorakit import cli
from tiny_lm import save_tiny_llama, write_jsonl


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
    from lorakit.errors import LorakitError
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
    argv = [
        "compare",
        "--methods",
        "lora,dora,adalora",
        "--model",
        model,
        "--data",
        data,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--out-dir",
        str(root / "runs"),
        "--name",
        "cmp",
        "--no-progress",
    ]
    code = cli.main(argv)
    out = capsys.readouterr().out
    directory = root / "runs" / "cmp"
    records = json.loads((directory / "compare.json").read_text())["methods"]
    assert [r["method"] for r in records] == ["lora", "dora", "adalora"]
    # a method that fails gets its reason in its row; the others ran
    assert records[2]["status"] == "failed" and records[2]["reason"] == "simulated failure of this method" and code == 2
    assert all(r["status"] == "done" and r["trainable_params"] > 0 and r["step_vs_limit"] > 0 for r in records[:2])
    # each run timed the limit beside its own steps; no separate timing afterwards
    assert all(r["limit_timed"] == "beside the run's steps" for r in records[:2])
    assert re.search(r"^lora\s+\S+", out, re.M) and "adalora  failed:" in out
    assert "x limit: timed in each method's run beside its own steps" in out
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
    base = [
        "compare",
        "--model",
        model,
        "--data",
        data,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out-dir",
        str(root / "runs2"),
        "--name",
        "c",
        "--no-progress",
        "--no-html",
    ]
    assert cli.main(base + ["--methods", "lora"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--methods", "lora", "--lr", "0.5"]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err
    assert cli.main(base + ["--methods", "lora,nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_per_method_arguments_reach_only_their_method(setup, capsys):
    root, model, data = setup
    argv = [
        "compare",
        "--methods",
        "lora,dora",
        "--model",
        model,
        "--data",
        data,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--out-dir",
        str(root / "runs3"),
        "--name",
        "per",
        "--no-progress",
        "--no-html",
        "--targets",
        "q_proj,v_proj",
        "--method-arg",
        "dora:r=2",
        "--method-arg",
        "dora:rslora=true",
        "--method-arg",
        "lora:lr=0.01",
        "--method-arg",
        "lora:alpha=4",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    import yaml

    from lorakit import io

    saved = {m: yaml.safe_load((root / "runs3" / "per" / m / "config.yaml").read_text()) for m in ("lora", "dora")}
    from lorakit.train import recipes

    assert saved["lora"]["lr"] == 0.01 and saved["dora"]["lr"] == recipes.learning_rate("dora")  # dora keeps its recipe
    assert saved["lora"]["alpha"] == 4 and saved["dora"]["alpha"] is None
    assert saved["dora"]["r"] == 2 and saved["lora"]["r"] is None
    assert saved["dora"]["method_args"] == {"rslora": True} and saved["lora"]["method_args"] == {}
    dora, lora = (io.read_config(root / "runs3" / "per" / m / "adapter")[0] for m in ("dora", "lora"))
    assert (dora.r, dora.rslora, lora.r, lora.rslora, lora.alpha) == (2, True, 8, False, 4)
    records = json.loads((root / "runs3" / "per" / "compare.json").read_text())["methods"]
    assert [r["lr"] for r in records] == [0.01, recipes.learning_rate("dora")]  # each row says its rate
    assert re.search(r"^lora\s+0\.01\s", capsys.readouterr().out, re.M)
    # another per-method value is another comparison: the directory refuses it
    capsys.readouterr()
    assert cli.main(argv[:-1] + ["lora:alpha=8"]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pair, message",
    [
        ("vera:r=256", "error: --method-arg 'vera:r=256': 'vera' is not one of --methods (lora, dora)"),
        ("dora:nosuch=1", "error: method 'dora' has no setting 'nosuch'; its settings: "),
        (
            "dora:steps=3",
            "error: --method-arg dora:steps=...: every method of a comparison has the same steps; per method: lr, ",
        ),
        ("dora:r", "error: --method-arg expects KEY=VALUE, got 'r'"),
        ("dora:r=many", "error: --method-arg dora:r: expected int, got 'many'"),
    ],
)
def test_per_method_argument_mistakes_are_one_line(setup, capsys, pair, message):
    root, model, data = setup
    code = cli.main(
        [
            "compare",
            "--methods",
            "lora,dora",
            "--model",
            model,
            "--data",
            data,
            "--steps",
            "1",
            "--out-dir",
            str(root / "runs4"),
            "--no-progress",
            "--no-html",
            "--method-arg",
            pair,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (root / "runs4").exists()  # refused before anything trained


def test_train_refuses_the_per_method_form(capsys):
    assert cli.main(["train", "--method-arg", "lora:r=4", "--print-config"]) == 2
    assert "the METHOD:KEY=VALUE form is for lorakit compare" in capsys.readouterr().err
