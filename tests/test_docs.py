"""The README and the documentation site: the strict build, the generated tables and references, the
getting-started page's code, and no work-tracking words where users read.

`mkdocs build --strict` runs when the docs extra is installed (`pip install -e .[docs]`) and skips,
saying so, otherwise; everything else needs only lorakit.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks():
    """docs/hooks/lorakit_docs.py: what the site build runs (it imports lorakit and the tables)."""
    return load_module("lorakit_docs_hooks", DOCS / "hooks" / "lorakit_docs.py")


@pytest.fixture(scope="module")
def tables(hooks):
    return sys.modules["tables"]


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


# --- the site ----------------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    missing = [
        m
        for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if importlib.util.find_spec(m.split(".")[0]) is None
        or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)
    ]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e .[docs]")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--quiet",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--method-arg" in cli and "lorakit export" in cli  # the generated reference is there
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "merge_and_unload" in api and "Attributes" in api  # rendered from the docstrings
    assert 'id="lorakit-explain"' in cli
    modules = (site / "reference" / "modules" / "index.html").read_text()
    for name in ("LorakitCallback", "lorakit_trainer", "lorakit.explain", "Explanation"):
        assert name in modules, f"{name} is missing from the modules reference"
    assert (site / "compare-report.png").is_file()
    assert not (site / "hooks").exists()  # the build's own code is not published


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    import yaml

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # BaseLoader: !!python tags as text

    def entries(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from entries(value) if isinstance(value, list) else [value]

    listed = set(entries(config["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "hooks" not in p.parts}
    assert listed - on_disk == set(), "nav names pages that do not exist"
    assert on_disk - listed == set(), "pages the nav does not reach (add them to mkdocs.yml's nav)"


# --- generated content -------------------------------------------------------------------------------


def test_generated_tables_match_the_result_files(tables):
    stale = {str(page.relative_to(ROOT)): tables.stale_blocks(page.read_text()) for page in pages()}
    stale = {page: names for page, names in stale.items() if names}
    assert not stale, f"tables differ from benchmarks/results (run `python benchmarks/tables.py`): {stale}"


def test_generated_tables_change_when_a_result_changes(tables, monkeypatch):
    page = (DOCS / "benchmarks" / "speed-memory.md").read_text()
    assert "<!-- generated: step-all -->" in page and not tables.stale_blocks(page)
    original = tables.load("step-cpu-all-methods.json")
    changed = {
        **original,
        "results": [
            {**r, "ms_per_step_all": [t / 2 for t in r["ms_per_step_all"]]} if r["condition"] == "lorakit lora" else r
            for r in original["results"]
        ],
    }
    load = tables.load
    monkeypatch.setattr(tables, "load", lambda name: changed if name == "step-cpu-all-methods.json" else load(name))
    assert "step-all" in tables.stale_blocks(page)


def test_every_table_a_page_names_exists_and_every_result_file_is_quoted(tables):
    names = {m.group("name") for page in pages() for m in tables.BLOCK.finditer(page.read_text())}
    for name in names:
        assert tables.generate(name).strip()
    quoted = "\n".join(tables.generate(name) for name in names) + "".join(p.read_text() for p in pages())
    globs = re.findall(r"[\w.-]*\*[\w.*-]*\.json", quoted)  # sst2-qlora-seed*.json
    unquoted = [
        p.name
        for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
        if p.name not in quoted and not any(fnmatch.fnmatch(p.name, g) for g in globs)
    ]
    assert unquoted == [], "result files no page quotes (superseded results go)"


def test_a_block_naming_no_table_or_missing_its_end_is_an_error(tables):
    with pytest.raises(tables.UnknownTable, match="no generated table named 'nosuch'"):
        tables.stale_blocks("<!-- generated: nosuch -->\n<!-- end generated -->\n")
    with pytest.raises(tables.UnknownTable, match="without its"):
        tables.stale_blocks("<!-- generated: ddp -->\n| a table |\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "reproduce:nosuch"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert run.returncode == 2 and run.stderr.startswith("error: no generated table named 'reproduce:nosuch'")
    assert run.stderr.count("\n") == 1


def test_cli_reference_lists_every_flag_of_every_command(hooks):
    from lorakit.cli.parser import build_parser

    text = hooks.cli_reference()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        assert f"## `lorakit {name}`" in text
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"lorakit {name} {option} is missing from the CLI reference"


def test_api_reference_documents_every_public_name(hooks):
    import lorakit

    text = hooks.api_reference()
    for name in lorakit.__all__:
        assert f"::: lorakit.{lorakit._PUBLIC[name]}.{name}" in text


SAMPLE = re.compile(r"<!-- sample: (?P<name>[\w-]+) -->\n```[^\n]*\n.*?```\n<!-- /sample -->\n", re.DOTALL)


def test_sample_outputs_are_fenced_blocks_between_their_markers():
    """A command's sample output sits between `<!-- sample: NAME -->` and `<!-- /sample -->`, one fenced
    block and nothing else, so a script can write it again from a real run."""
    names = []
    for page in pages():
        text = page.read_text()
        found = [m.group("name") for m in SAMPLE.finditer(text)]
        assert text.count("<!-- sample:") == len(found) == text.count("<!-- /sample -->"), page
        names += found
    assert len(names) == len(set(names)), "two samples share a name"
    assert {"default-train", "sst2-train", "sst2-inspect"} <= set(names)


def test_table_cells_show_help_text_literally(hooks):
    assert hooks.cell("runs/<name> a|b __base__ `x|y` *.jsonl") == r"runs/&lt;name&gt; a\|b \_\_base\_\_ `x|y` \*.jsonl"


# --- the front page ------------------------------------------------------------------------------------


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "./install.sh && lorakit train" in text  # CI and users rely on these two
    assert "python3 -m pytest -q" in text
    assert "pip install -e .[docs]" in text and "mkdocs serve" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# Work-tracking words: issue numbers, work targets, work history. A figure says what was measured. (A
# command's `--before COMMIT` flag, which times an earlier version beside the current one, is a command.)
INTERNAL = re.compile(
    r"\bissues? \d+|\bthe issue\b|issue's|\btargets? (met|hold)|\bthis session\b|"
    r"\bwhen issue\b|(?<!--)\bbefore [0-9a-f]{7}\b|\(issue",
    re.IGNORECASE,
)


def test_no_work_tracking_words_where_users_read(hooks):
    found = []
    for page in pages():
        found += [f"{page.relative_to(ROOT)}: {m.group(0)!r}" for m in INTERNAL.finditer(page.read_text())]
    found += [f"lorakit --help: {m.group(0)!r}" for m in INTERNAL.finditer(hooks.cli_reference())]
    for path in sorted((ROOT / "src" / "lorakit").rglob("*.py")):  # docstrings and help texts
        found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in INTERNAL.finditer(path.read_text())]
    assert found == []


def test_the_checks_find_what_they_look_for(hooks):
    for text in ("as before issue 20", "the issue's target", "targets met", "before f97e01b", "(issue 21)"):
        assert INTERNAL.search(text), text
    for text in ("targets=['q_proj']", "target_r", "an issue with the data", "before 10 steps", "--before 75db26a"):
        assert not INTERNAL.search(text), text


# --- the getting-started page runs -------------------------------------------------------------------


def run_python_blocks(tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "getting_started"}
    for block in code_blocks(GETTING_STARTED, "python"):
        exec(compile(block, str(GETTING_STARTED), "exec"), scope)
    return scope


def test_getting_started_python_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The page's Python, as written, with the built-in model swapped for a tiny random one of the same
    vocabulary (the real tokenizer; the integration test below runs the real model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit.models

    vocabulary = len(lorakit.models.load_tokenizer())

    def tiny_causal_lm(*args, **kwargs):
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocabulary,
                max_position_embeddings=64,
            )
        )

    monkeypatch.setattr(lorakit.models, "load_causal_lm", tiny_causal_lm)
    scope = run_python_blocks(tmp_path, monkeypatch)
    assert (tmp_path / "capitals-adapter" / "adapter_model.safetensors").is_file()
    assert not any(type(m).__module__.startswith("lorakit") for m in scope["plain"].modules())


@pytest.mark.integration
def test_getting_started_python_runs_on_the_builtin_model(tmp_path, monkeypatch):
    scope = run_python_blocks(tmp_path, monkeypatch)
    assert (tmp_path / "capitals-adapter" / "adapter_config.json").is_file()
    assert scope["loss"].item() < 10


def shell_script(budget: str) -> str:
    """The page's shell blocks as one script: install lines left out, `runs/<name>` the latest run, and
    every `lorakit train` given a small budget after its own flags (the last flag wins)."""
    lines = ["set -euo pipefail"]
    for block in code_blocks(GETTING_STARTED, "bash"):
        for line in block.splitlines():
            if line.startswith(("./install.sh", "pip ", "PYTHON=", "LORAKIT_")):
                continue
            line = line.replace("runs/<name>", '"$(ls -td runs/*/ | head -1)"')
            if line.startswith("lorakit train"):
                line = line.split("#")[0].rstrip() + " " + budget
            lines.append(line)
    return "\n".join(lines) + "\n"


def test_getting_started_shell_blocks_are_what_the_test_runs():
    script = shell_script("--steps 2")
    assert "lorakit train --steps 2" in script  # the built-in job
    assert "lorakit train --data capitals.jsonl --steps 20 --name capitals --steps 2" in script
    assert "cat > capitals.jsonl <<'EOF'" in script and "runs/<name>" not in script


@pytest.mark.integration
def test_getting_started_commands_run(tmp_path):
    budget = "--steps 2 --max-eval-examples 2 --batch-size 2 --max-length 64 --no-progress"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        ["bash", "-c", shell_script(budget)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (tmp_path / "runs" / "capitals" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "capitals-dora" / "adapter" / "adapter_config.json").is_file()
    assert "method: vera" in run.stdout  # --print-config
