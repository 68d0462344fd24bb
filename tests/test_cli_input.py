"""What the commands accept: settings that would run silently wrong or end in a traceback are refused
in one line (`error: ...`, exit 2) before anything slow; odd but valid input works."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.cli.generate import prompt_jobs
from lorakit.errors import LorakitError
from tiny_lm import save_tiny_bert, save_tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def main(argv: list[str]) -> int:
    """`lorakit ARGV`'s exit status (argparse's own refusals exit through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def jobs(tmp_path: Path, content: bytes | str, names=("sql", "chat"), file="prompts.jsonl") -> list[tuple[str, str]]:
    path = tmp_path / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prompt_jobs(argparse.Namespace(prompts=str(path), prompt=None, use=None), list(names))


# --- generate --prompts ------------------------------------------------------------------------------


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    content = b'\xef\xbb\xbf{"prompt": "hello", "adapter": "chat"}\n{"prompt": "x"}\n'
    assert jobs(tmp_path, content) == [("chat", "hello"), ("sql", "x")]


def test_plain_lines_are_prompts_and_json_lines_are_records(tmp_path):
    assert jobs(tmp_path, '["a"]\n\n{"b": 1}\n', file="p.txt") == [("sql", '["a"]'), ("sql", '{"b": 1}')]
    assert jobs(tmp_path, "{ code as a prompt\nsecond\n", file="p.txt") == [
        ("sql", "{ code as a prompt"),
        ("sql", "second"),
    ]
    assert jobs(tmp_path, '{"prompt": "a"}\n{"prompt": "b", "adapter": "__base__"}\n') == [
        ("sql", "a"),
        ("__base__", "b"),
    ]
    assert jobs(tmp_path, '{"prompt": "a", "adapter": "chat"}\n', file="p.txt") == [
        ("chat", "a")
    ]  # JSON Lines by content
    with pytest.raises(LorakitError, match=r"p\.jsonl:1: not valid JSON .*plain prompts go in a \.txt file"):
        jobs(tmp_path, "a plain prompt\n", file="p.jsonl")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": 5}\n', r"prompts\.jsonl:1: needs a string \"prompt\".*got 5"),
        ('{"prompt": ["a", "b"]}\n', r":1: needs a string \"prompt\""),
        ('{"prompt": null, "adapter": "sql"}\n', r":1: needs a string \"prompt\".*got None"),
        ('{"prompt": "a"}\n["a"]\n', r":2: expected a JSON object"),
        ('{"prompt": "a"}\nplain text\n', r":2: not valid JSON .*JSON Lines throughout"),
        ('["a"]\n', r":1: expected a JSON object .*got list \(plain prompts go in a \.txt file"),
        (
            '[{"prompt": "a"}, {"prompt": "b"}]\n',
            r":1: expected a JSON object .*got list \(a list of records goes one record a line",
        ),
        ('{"prompt": "a", "adapter": ' + "[" * 100_000 + "]" * 100_000 + "}\n", r":1: JSON nested too deeply"),
        ('{"prompt": "a", "adapter": ' + "9" * 5000 + "}\n", r":1: a number with too many digits"),
        ('{"prompt": "a", "adapter": 1e999}\n', r":1: \"adapter\" must be a name, got inf"),
        ('{"prompt": "a", "adaptor": "chat"}\n', r":1: unknown key\(s\) \['adaptor'\].*did you mean 'adapter'"),
        ('{"prompt": "a", "adapter": "Chat"}\n', r":1: no adapter named 'Chat'.*did you mean 'chat'"),
        ("\n  \n", r"no prompts"),
        ('{"prompt": "a\\ud800b"}\n', r":1: \"prompt\" holds an invalid character \('\\ud800': a lone surrogate"),
    ],
)
def test_bad_prompt_files_are_one_line_naming_the_line(tmp_path, content, message):
    with pytest.raises(LorakitError, match=message) as caught:
        jobs(tmp_path, content)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def explain_jobs(tmp_path, raw: bytes, **flags):
    from lorakit.cli.explain import read_jobs

    (tmp_path / "p.jsonl").write_bytes(raw)
    args = dict(prompts=str(tmp_path / "p.jsonl"), prompt=None, completion=None, text_pair=None, label=None)
    return read_jobs(argparse.Namespace(**(args | flags)))


def test_explain_reads_a_prompts_file_with_a_byte_order_mark(tmp_path):
    found = explain_jobs(tmp_path, b'\xef\xbb\xbf{"prompt": "Say dog:", "completion": " dog"}\nplain\n')
    assert [(j.prompt, j.completion) for j in found] == [("Say dog:", " dog"), ("plain", None)]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'{"prompt": "a", "label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
            r"p\.jsonl:1: JSON nested too deeply",
        ),
        (b'{"prompt": "a", "label": ' + b"9" * 5000 + b"}\n", r"p\.jsonl:1: a number with too many digits"),
        (b'{"prompt": "a\\ud800b"}\n', r"p\.jsonl:1: \"prompt\" holds an invalid character"),
        (b'{"prompt": "a", "completion": "\\udc80"}\n', r"p\.jsonl:1: \"completion\" holds an invalid character"),
        (
            b'{"promt": "a"}\n',
            r"p\.jsonl:1: needs a non-empty string \"prompt\" .*got None \(did you mean 'prompt'\?\)",
        ),
        (
            b'{"prompt": "a", "label": [' + b"1, " * 5000 + b"1]}\n",
            r"p\.jsonl:1: \"label\" must be a class name or index, got \[1, 1, .*\.\.\.\]$",
        ),
    ],
)
def test_bad_explain_prompt_files_are_one_line_naming_the_line(tmp_path, content, message):
    with pytest.raises(LorakitError, match=message) as caught:
        explain_jobs(tmp_path, content)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_prompts_of_bytes_that_are_not_utf8_are_one_line(tiny_model, tmp_path, capsys):
    from lorakit.cli.explain import read_jobs

    not_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands a Latin-1 argument to the program
    assert main(["generate", "--model", tiny_model, "--max-new-tokens", "2", not_utf8]) == 2
    assert re.fullmatch(
        r"error: the prompt holds an invalid character \('\\udce9': a lone surrogate.*", error_line(capsys)
    )
    with pytest.raises(LorakitError, match=r"^the prompt holds an invalid character"):
        read_jobs(argparse.Namespace(prompts=None, prompt=not_utf8, completion=None, text_pair=None, label=None))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature: must be 0 \\(greedy\\) or a finite positive number, got -1"),
        (["--temperature", "nan"], "--temperature: must be 0 .* got nan"),
        (["--temperature", "inf"], "--temperature: must be 0 .* got inf"),
        (["--temperature", "warm"], "--temperature: 'warm' is not a number"),
        (["--max-new-tokens", "-1"], "--max-new-tokens: must be positive, got -1"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be positive, got 0"),
        (["--temperature", "1e-300"], "--temperature: must be 0 \\(greedy\\) or at least 0.001 .* got 1e-300"),
        (["--adapter", "=", "--model", "x"], "the adapter path is empty; give an adapter or run directory"),
        (["--adapter", " "], "the adapter path is empty"),
        (
            ["--seed", str(2**70)],
            "--seed: must be an integer from -2147483647 to 2147483647, got 1180591620717411303424",
        ),
        (["--seed", "1.5"], "--seed: '1.5' is not an integer"),
    ],
)
def test_generate_settings_that_ran_greedy_or_crashed_are_refused(flags, message, capsys):
    assert main(["generate", *flags, "hello"]) == 2
    assert re.search(message, error_line(capsys))


def test_an_empty_prompt_starts_from_the_beginning_of_text(tiny_model, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": ""}\n')
    assert (
        cli.main(["generate", "--model", tiny_model, "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2"])
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == ""
    assert cli.main(["generate", "--model", tiny_model, "--max-new-tokens", "2", ""]) == 0


def test_generation_stays_within_the_models_positions(tiny_model, tmp_path, capsys):
    # the tiny model reads 256 positions
    assert cli.main(["generate", "--model", tiny_model, "--max-new-tokens", "100000", "hi"]) == 0
    assert "note: --max-new-tokens 100000 runs past the 256 positions" in capsys.readouterr().err
    (tmp_path / "long.txt").write_text("word " * 400 + "\n")
    assert cli.main(["generate", "--model", tiny_model, "--prompts", str(tmp_path / "long.txt")]) == 2
    assert "long.txt: prompt 1 is 401 tokens; the model reads at most 256 positions" in error_line(capsys)


# --- train settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "1e39"], r"lr = 1e\+39 is larger than the float32 weights can take"),
        (["--lr", "1e30", "--loraplus-ratio", "1e10"], r"lr x loraplus_ratio = 1e\+40 is larger"),
        (["--lr", "1e30", "--weight-decay", "1e10"], r"lr x weight_decay = 1e\+40 is larger"),
    ],
)
def test_a_learning_rate_past_float32_is_refused_before_the_model_loads(flags, message, tmp_path, capsys, monkeypatch):
    from lorakit import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["train", "--out-dir", str(tmp_path), *flags]) == 2
    assert re.search(message, error_line(capsys))


def test_max_length_above_the_models_positions_is_cut_with_a_note(tmp_path, capsys):
    # a 200 KB field: BERT's 256 learned positions failed in the embeddings with a tensor-size error
    bert = save_tiny_bert(tmp_path / "bert")
    rows = ["text,label"] + [f"good movie {i},1" for i in range(6)] + ['"' + "good " * 40_000 + '",0']
    rows += [f"bad movie {i},0" for i in range(6)]
    (tmp_path / "big.csv").write_text("\n".join(rows) + "\n")
    args = [
        "--model",
        str(bert),
        "--task",
        "classify",
        "--data",
        str(tmp_path / "big.csv"),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--out-dir",
        str(tmp_path / "runs"),
        "--name",
        "big",
        "--no-progress",
    ]
    assert cli.main(["train", *args, "--max-length", "1000"]) == 0
    assert "note: --max-length 1000 is above the 256 positions" in "".join(capsys.readouterr())
    assert "max_length: 256" in (tmp_path / "runs" / "big" / "config.yaml").read_text()
    assert cli.main(["eval", "--adapter", str(tmp_path / "runs" / "big"), "--data", str(tmp_path / "big.csv")]) == 0
    assert cli.main(["train", *args, "--name", "default", "--steps", "1"]) == 0  # the default 512: cut without a note
    assert "note: --max-length" not in "".join(capsys.readouterr())
    assert "max_length: 256" in (tmp_path / "runs" / "default" / "config.yaml").read_text()


def test_max_length_within_the_positions_is_kept(tiny_model, tmp_path, capsys):
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"the {w} jumps"} for w in "apple river stone cloud tiger".split()])
    assert (
        cli.main(
            [
                "train",
                "--model",
                tiny_model,
                "--data",
                str(tmp_path / "t.jsonl"),
                "--steps",
                "1",
                "--max-length",
                "64",
                "--out-dir",
                str(tmp_path),
                "--name",
                "t",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "note: --max-length" not in "".join(capsys.readouterr())
    assert "max_length: 64" in (tmp_path / "t" / "config.yaml").read_text()


# --- help, names, typos --------------------------------------------------------------------------------


COMMANDS = ["train", "eval", "compare", "inspect", "explain", "generate", "merge", "export"]


def test_help_of_every_command_loads_no_torch():
    import subprocess
    import sys

    script = (
        "import sys\nfrom lorakit import cli\nfor argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'numpy') if m in sys.modules)\n"
        "print('IMPORTED', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *COMMANDS], capture_output=True, text=True, timeout=120)
    assert "IMPORTED []" in done.stderr.splitlines(), done.stderr[-2000:]
    for command in COMMANDS:
        assert f"usage: lorakit {command}" in done.stdout


def test_version(capsys):
    import lorakit

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lorakit {lorakit.__version__}\n"


def test_one_list_of_method_names_for_help_and_errors(capsys):
    from lorakit.methods import METHODS
    from lorakit.train import config

    assert sorted(METHODS) == sorted(config.BUILTIN_METHODS)  # the torch-free list is the registry
    names = config.method_names(METHODS)
    assert names[-2:] == ["qlora", "lora-plus"] and len(names) == len(METHODS) + 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Choices: {', '.join(names)}." in help_text
    assert main(["train", "--method", "lroa"]) == 2
    assert error_line(capsys).endswith(f"choose from: {', '.join(names)} (did you mean 'lora'?)")
    assert main(["compare", "--methods", "lora,dorra", "--steps", "1"]) == 2
    assert f"choose from: {', '.join(names)} (did you mean 'dora'?)" in error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], r"invalid choice: 'trian' .* \(did you mean 'train'\?\) \(see lorakit --help\)"),
        (
            ["train", "--stpes", "3"],
            r"lorakit train: unrecognized arguments: --stpes 3 \(did you mean '--steps'\?\) \(see lorakit train --help\)",
        ),
        (
            ["eval", "--tsk=classify"],
            r"lorakit eval: unrecognized arguments: --tsk=classify \(did you mean '--task'\?\)",
        ),
        (["eval", "--task", "clasify"], r"invalid choice: 'clasify' .*\(did you mean 'classify'\?\)"),
        (["train", "--task", "clasify"], r"task: 'clasify' is not one of .*\(did you mean 'classify'\?\)"),
        (["train", "--method-arg", "rr=3"], r"method 'lora' has no setting 'rr'.*\(did you mean 'r'\?\)"),
        (["train", "--method", "qlroa"], r"\(did you mean 'qlora'\?\)"),
        (
            ["train", "--columns", "txt=sentence", "--print-config"],
            r"--columns: 'txt' is not one of lorakit's columns .*\(did you mean 'text'\?\)",
        ),
        (["explian", "--adapter", "x"], r"invalid choice: 'explian' .* \(did you mean 'explain'\?\)"),
        (
            ["explain", "--adaptr", "x", "p"],
            r"lorakit explain: unrecognized arguments: --adaptr \(did you mean '--adapter'\?\); "
            r"the following arguments are required: --adapter",
        ),
        (["compare", "--method", "lora,dora"], r"required: --methods \(did you mean '--methods' for '--method'\?\)"),
        (
            ["merge", "--adapter", "x", "--outt", "y"],
            r"lorakit merge: unrecognized arguments: --outt \(did you mean '--out'\?\)",
        ),
        (
            ["explain", "--adapter", "x", "--tpo", "3", "p"],
            r"lorakit explain: unrecognized arguments: --tpo .*\(did you mean '--top'\?\)",
        ),
        (
            ["explain", "--adapter", "x", "--task", "clasify", "p"],
            r"invalid choice: 'clasify' .*\(did you mean 'classify'\?\)",
        ),
    ],
)
def test_typos_get_the_closest_name(argv, message, capsys):
    assert main(argv) == 2
    assert re.search(message, error_line(capsys))


def test_a_config_file_field_typo_gets_the_closest_name(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("learning_rate: 0.001\nstesp: 3\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    assert error_line(capsys).endswith("(did you mean 'lr' for 'learning_rate'; 'steps' for 'stesp'?)")


def test_a_task_other_than_the_runs_is_a_warning(tmp_path, capsys):
    from lorakit.cli.adapters import adapter_dir_and_config, chosen_task

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("task: causal-lm\n")
    adapter, cfg = adapter_dir_and_config(str(tmp_path / "run"))
    assert chosen_task(None, cfg, adapter) == "causal-lm" and chosen_task("causal-lm", cfg, adapter) == "causal-lm"
    assert capsys.readouterr().err == ""
    assert chosen_task("classify", cfg, adapter) == "classify"
    assert re.fullmatch(
        r"warning: .*run trained a causal-lm model; --task classify loads the base as a classify model, "
        r"with an output head this adapter was not trained with\n",
        capsys.readouterr().err,
    )
