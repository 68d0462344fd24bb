"""The `lorakit` command line end to end on a tiny random model; one-line errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from lorakit import cli
from tiny_lm import save_tiny_llama, write_jsonl

WORDS = "apple river stone cloud tiger green lamp piano honey fox dog movie".split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(
        d / "alpaca.jsonl",
        [{"instruction": "Reverse", "input": f"{a} {b}", "output": f"{b} {a}"} for a in WORDS for b in WORDS[:3]],
    )
    write_jsonl(
        d / "chat.jsonl",
        [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]} for w in WORDS],
    )
    write_jsonl(d / "text.jsonl", [{"text": f"the {w} jumps over the lazy dog"} for w in WORDS])
    return d


@pytest.fixture(scope="module")
def trained_run(tiny_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / "alpaca.jsonl"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--out-dir",
            str(out),
            "--name",
            "a",
            "--no-progress",
            "--r",
            "4",
            "--lr",
            "0.01",
        ]
    )
    assert code == 0
    return out / "a"


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_train_writes_run_and_summary(trained_run, capsys):
    for name in ("adapter/adapter_model.safetensors", "config.yaml", "metrics.jsonl", "report.txt"):
        assert (trained_run / name).is_file()
    assert "r: 4" in (trained_run / "config.yaml").read_text()


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_train_other_formats(fmt, tiny_model, data_dir, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / f"{fmt}.jsonl"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out-dir",
            str(tmp_path),
            "--name",
            fmt,
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "eval_loss (held-out)" in out and f"saved to {tmp_path / fmt}/" in out


def test_config_file_and_flag_precedence(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("lr: 0.0005\nsteps: 40\nmethod_args: {rslora: true}\n")
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0005" in out and "steps: 7" in out and "rslora: true" in out


def test_help_comes_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "Optimizer steps to train (overrides --epochs)" in out and "--method-arg KEY=VALUE" in out


def test_generate_with_several_adapters_and_a_per_prompt_choice(trained_run, tiny_model, data_dir, tmp_path, capsys):
    out = trained_run.parent
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / "text.jsonl"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--out-dir",
            str(out),
            "--name",
            "b",
            "--no-progress",
            "--r",
            "4",
            "--lr",
            "0.05",
            "--method",
            "dora",
        ]
    )
    assert code == 0
    capsys.readouterr()
    one_by_one = {}
    for name in ("a", "b", "__base__"):
        assert (
            cli.main(
                [
                    "generate",
                    "--adapter",
                    str(trained_run),
                    "--adapter",
                    str(out / "b"),
                    "--use",
                    name,
                    "--max-new-tokens",
                    "5",
                    "apple river",
                ]
            )
            == 0
        )
        one_by_one[name] = capsys.readouterr().out.strip()
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(
        prompts,
        [
            {"prompt": "apple river", "adapter": "a"},
            {"prompt": "apple river", "adapter": "b"},
            {"prompt": "apple river", "adapter": "__base__"},
            {"prompt": "apple river"},
        ],
    )
    assert (
        cli.main(
            [
                "generate",
                "--adapter",
                str(trained_run),
                "--adapter",
                f"b={out / 'b'}",
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in rows] == ["a", "b", "__base__", "a"]  # no "adapter": the first one
    for row in rows:
        assert row["completion"].strip() == one_by_one[row["adapter"]]
    # bad input: one line each, exit 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "adapter": "c"}\n')
    assert cli.main(["generate", "--adapter", str(trained_run), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: no adapter named 'c'" in error_line(capsys)
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    assert cli.main(["generate", "--adapter", str(trained_run), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: needs a string" in error_line(capsys)
    assert cli.main(["generate", "--adapter", str(trained_run), "--adapter", str(trained_run), "x"]) == 2
    assert "the name 'a' is taken" in error_line(capsys)
    assert cli.main(["generate", "--adapter", f"__base__={trained_run}", "x"]) == 2
    assert "adapter name" in error_line(capsys)


def test_eval_generate_merge(trained_run, tiny_model, data_dir, tmp_path, capsys):
    assert cli.main(["eval", "--adapter", str(trained_run), "--data", str(data_dir / "alpaca.jsonl")]) == 0
    assert "eval_loss" in capsys.readouterr().out
    assert cli.main(["generate", "--adapter", str(trained_run), "--max-new-tokens", "4", "apple river"]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(trained_run), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    import lorakit

    plain = AutoModelForCausalLM.from_pretrained(merged)
    adapted = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_error_missing_model(tmp_path, data_dir, capsys):
    code = cli.main(
        ["train", "--model", str(tmp_path / "nope"), "--data", str(data_dir / "text.jsonl"), "--out-dir", str(tmp_path)]
    )
    assert code == 2 and "does not exist" in error_line(capsys)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
        ("", r"bad.jsonl: no examples"),
        ('{"question": "q"}\n', r"bad.jsonl:1: no known layout in the columns"),
        ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', r"bad.jsonl:2: mixed layouts"),
    ],
)
def test_bad_data_is_one_line_error(content, message, tiny_model, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(content)
    code = cli.main(["train", "--model", tiny_model, "--data", str(tmp_path / "bad.jsonl"), "--out-dir", str(tmp_path)])
    assert code == 2
    assert message.replace("\\", "") in error_line(capsys)


def test_bad_flag_values(capsys, tmp_path):
    assert cli.main(["train", "--steps", "many", "--print-config"]) == 2
    assert "steps: expected int" in error_line(capsys)
    assert cli.main(["train", "--schedule", "wavy", "--print-config"]) == 2
    assert "not one of cosine, linear, constant" in error_line(capsys)
    assert cli.main(["train", "--method-arg", "oops", "--print-config"]) == 2
    assert "KEY=VALUE" in error_line(capsys)
    assert cli.main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in error_line(capsys)


def test_label_mismatch_via_cli(tmp_path, capsys):
    from tiny_lm import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    (tmp_path / "e.tsv").write_text("sentence\tlabel\nmeh\t2\n")
    code = cli.main(
        [
            "train",
            "--task",
            "classify",
            "--model",
            str(model),
            "--data",
            str(tmp_path / "t.tsv"),
            "--eval-data",
            str(tmp_path / "e.tsv"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 2 and "e.tsv:2: label '2' is not among the training labels ['0', '1']" in error_line(capsys)


def test_resume_of_missing_run(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "gone")]) == 2
    assert "no checkpoint to resume from" in error_line(capsys)


def test_eval_classifier_keeps_training_label_order(tmp_path, capsys):
    from tiny_lm import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "good\tpos\nbad\tneg\n" * 4)
    assert (
        cli.main(
            [
                "train",
                "--task",
                "classify",
                "--model",
                str(model),
                "--data",
                str(tmp_path / "t.tsv"),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--out-dir",
                str(tmp_path),
                "--name",
                "c",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (tmp_path / "only_pos.tsv").write_text("sentence\tlabel\ngood\tpos\n")  # one class: indices from training
    assert cli.main(["eval", "--adapter", str(tmp_path / "c"), "--data", str(tmp_path / "only_pos.tsv")]) == 0
    assert "accuracy" in capsys.readouterr().out
    (tmp_path / "other.tsv").write_text("sentence\tlabel\nmeh\tneutral\n")
    assert cli.main(["eval", "--adapter", str(tmp_path / "c"), "--data", str(tmp_path / "other.tsv")]) == 2
    assert "label 'neutral' is not among the training labels ['neg', 'pos']" in error_line(capsys)


@pytest.mark.parametrize(
    "extra",
    [
        ["--quantize", "nf4"],
        ["--method", "qlora"],
        ["--method", "qlora", "--init", "loftq"],
        ["--gradient-checkpointing"],
        ["--method", "dora", "--loraplus-ratio", "16"],
    ],
)
def test_train_options(extra, tiny_model, data_dir, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / "text.jsonl"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out-dir",
            str(tmp_path),
            "--name",
            "x",
            "--no-progress",
            *extra,
        ]
    )
    assert code == 0, capsys.readouterr().err
    if "nf4" in extra or "qlora" in extra:  # the adapter records the quantized base; eval re-quantizes a fresh base
        meta = json.loads((tmp_path / "x" / "adapter" / "lorakit.json").read_text())
        assert "quantization" in meta
        if "qlora" in extra:  # QLoRA's defaults
            assert (meta["config"]["method"], meta["config"]["r"], meta["config"]["alpha"]) == ("lora", 64, 16.0)
        assert meta["config"]["init"] == ("loftq" if "loftq" in extra else "default")
        capsys.readouterr()
        assert cli.main(["eval", "--adapter", str(tmp_path / "x")]) == 0
        # the base streamed into NF4 for eval holds the same bits training had: the same metric
        from lorakit.train.report import format_metrics

        after = json.loads((tmp_path / "x" / "report.json").read_text())["after"]
        assert format_metrics(after) in capsys.readouterr().out


def test_loftq_needs_a_quantized_base_and_a_low_rank_method(tiny_model, data_dir, tmp_path, capsys):
    common = [
        "train",
        "--model",
        tiny_model,
        "--data",
        str(data_dir / "text.jsonl"),
        "--steps",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    assert cli.main([*common, "--init", "loftq"]) == 2
    assert "add --quantize nf4" in error_line(capsys)
    assert cli.main([*common, "--init", "loftq", "--quantize", "nf4", "--method", "vera"]) == 2
    assert "method 'vera' has no 'init' setting" in error_line(capsys)


def test_targets_matching_nothing_is_one_line_error(tiny_model, data_dir, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / "text.jsonl"),
            "--targets",
            "no_such_proj",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2 and "target module(s) ['no_such_proj'] not found in the model" in error_line(capsys)
    code = cli.main(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(data_dir / "text.jsonl"),
            "--targets",
            ".*nothing.*",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2 and "matched no adaptable module" in error_line(capsys)


def test_python_dash_m_lorakit_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--print-config"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "method: lora" in out.stdout


def test_a_damaged_adapter_is_one_line(tmp_path, capsys):
    from test_io import damaged_copies

    for name, directory in damaged_copies(tmp_path):
        assert cli.main(["eval", "--adapter", str(directory), "--max-examples", "2"]) == 2, name
        assert "cannot load adapter" in error_line(capsys), name


def test_merge_never_writes_over_the_base_or_a_file(trained_run, tiny_model, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in Path(tiny_model).iterdir()}
    assert cli.main(["merge", "--adapter", str(trained_run), "--model", tiny_model, "--out", tiny_model]) == 2
    assert "is the base model's own directory" in error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in Path(tiny_model).iterdir()} == before
    (tmp_path / "taken").write_text("not a directory")
    assert cli.main(["merge", "--adapter", str(trained_run), "--out", str(tmp_path / "taken")]) == 2
    assert "is an existing file" in error_line(capsys)
    assert (tmp_path / "taken").read_text() == "not a directory"
    assert cli.main(["merge", "--adapter", str(trained_run), "--out", str(trained_run)]) == 2
    assert "is the adapter's run directory" in error_line(capsys)


def test_resume_refuses_settings_it_cannot_honour(trained_run, capsys):
    assert cli.main(["train", "--resume", str(trained_run), "--lr", "0.5", "--r", "8", "--no-progress"]) == 2
    line = error_line(capsys)
    assert "a resume cannot change r (4 -> 8), lr (0.01 -> 0.5)" in line and "another --name" in line
    assert cli.main(["train", "--resume", str(trained_run), "--method", "dora", "--print-config"]) == 2
    assert "method ('lora' -> 'dora')" in error_line(capsys)
    assert (
        cli.main(["train", "--resume", str(trained_run), "--steps", "5", "--keep-checkpoints", "3", "--print-config"])
        == 0
    )
    assert "steps: 5" in capsys.readouterr().out


def test_config_errors_come_before_any_model_is_loaded(capsys, monkeypatch):
    from lorakit.train import loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking the config"))
    monkeypatch.setattr(
        loop, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer before checking the config")
    )
    assert cli.main(["train", "--method", "nosuch", "--no-progress"]) == 2
    assert "unknown method 'nosuch'" in error_line(capsys)
    assert cli.main(["train", "--method-arg", "rslora=maybe", "--no-progress"]) == 2
    assert "rslora must be true or false" in error_line(capsys)
    assert cli.main(["train", "--dropout", "1.5", "--print-config"]) == 2
    assert "dropout must be in [0, 1)" in error_line(capsys)
    assert cli.main(["train", "--targets", "q_proj[", "--no-progress"]) == 2
    assert "is not a valid regular expression" in error_line(capsys)


def test_an_adapter_records_its_base_and_another_base_is_warned_about(trained_run, tiny_model, tmp_path, capsys):
    import json as json_mod

    saved = json_mod.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == tiny_model
    assert (
        json_mod.loads((trained_run / "adapter" / "lorakit.json").read_text())["base_model_name_or_path"] == tiny_model
    )
    from tiny_lm import save_tiny_llama

    other = str(save_tiny_llama(tmp_path / "other-base", seed=1))
    assert cli.main(["generate", "--adapter", str(trained_run), "--model", other, "--max-new-tokens", "2", "x"]) == 0
    assert (
        f"warning: {trained_run / 'adapter'} was trained on {tiny_model}; loading it onto {other}"
        in capsys.readouterr().err
    )
    assert cli.main(["generate", "--adapter", str(trained_run), "--max-new-tokens", "2", "x"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_run_config_paths_work_from_any_directory_and_help_lists_methods(
    tiny_model, data_dir, tmp_path, capsys, monkeypatch
):
    from lorakit.train import config as config_mod

    monkeypatch.chdir(data_dir)  # a run started with relative paths
    assert (
        cli.main(
            [
                "train",
                "--model",
                tiny_model,
                "--data",
                "alpaca.jsonl",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out-dir",
                str(tmp_path / "runs"),
                "--name",
                "rel",
                "--no-progress",
                "--r",
                "2",
            ]
        )
        == 0
    )
    saved = config_mod.load_yaml(tmp_path / "runs" / "rel" / "config.yaml")
    assert saved["data"] == str(data_dir / "alpaca.jsonl")
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its data
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(tmp_path / "runs" / "rel")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "adalora, delta-lora, dora, lora, lora-drop, lora-fa, vera, qlora" in " ".join(text.split())
    assert "(default: None)" not in text


def test_ctrl_c_while_importing_is_a_clean_exit():
    """The command starts without torch (lorakit's packages import it on first use), so a Ctrl-C
    during the slow imports reaches `main`, which exits with 130 and no traceback."""
    import signal
    import subprocess
    import sys
    import time

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lorakit.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    # `lorakit` as the console script runs it (import lorakit.cli, call main), telling us when main starts
    script = (
        "import sys, lorakit.cli; print('ready', flush=True); sys.exit(lorakit.cli.main(['train', '--print-config']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside main, importing torch (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the imports finished before the signal (a very fast machine)")
    assert proc.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted", err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--nproc", "0"],
            "error: lorakit train: argument --nproc: must be positive, got 0 (see lorakit train --help)",
        ),
        (["train", "--bogus"], "error: lorakit train: unrecognized arguments: --bogus"),
        (["nosuch"], "error: lorakit: argument command: invalid choice: 'nosuch'"),
        (["train", "--data", ""], "error: the data path is empty"),
    ],
)
def test_usage_mistakes_are_one_line(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exit
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_each_method_gets_its_recipe_learning_rate_unless_given(capsys):
    from lorakit.train import recipes
    from lorakit.train.config import TrainConfig
    from lorakit.train.method_config import check_config

    assert check_config(TrainConfig()).lr == recipes.LORA_LR
    assert check_config(TrainConfig(method="lora-fa")).lr == pytest.approx(3 * recipes.LORA_LR)
    assert check_config(TrainConfig(method="vera")).lr == pytest.approx(30 * recipes.LORA_LR)
    assert check_config(TrainConfig(method="adalora")).lr == pytest.approx(10 * recipes.LORA_LR)
    assert check_config(TrainConfig(method="qlora")).lr == recipes.LORA_LR  # LoRA over a 4-bit base
    plus = check_config(TrainConfig(method="lora-plus"))  # LoRA, B at 16x A's rate, the pair at 1/4 of LoRA's
    assert (plus.method, plus.loraplus_ratio, plus.lr) == ("lora", 16.0, pytest.approx(recipes.LORA_LR / 4))
    assert check_config(TrainConfig(method="lora-plus", loraplus_ratio=4.0)).loraplus_ratio == 4.0
    assert check_config(TrainConfig(method="vera", lr=1e-4)).lr == 1e-4  # --lr wins
    assert cli.main(["train", "--method", "lora-fa", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# lr: the lora-fa recipe, 0.006 (3x LoRA's") and "\nlr: 0.006\n" in out


def test_eval_of_a_run_tokenizes_only_the_held_out_examples(trained_run, monkeypatch, capsys):
    from lorakit.train import data as data_mod

    encoded = []
    real = data_mod.encode_causal

    def counting(records, *args, **kwargs):
        encoded.append(len(records))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(data_mod, "encode_causal", counting)
    assert cli.main(["eval", "--adapter", str(trained_run)]) == 0
    out = capsys.readouterr().out
    held_out = int(re.search(r"on (\d+) held-out examples", out).group(1))
    assert encoded == [held_out] and held_out < len(WORDS) * 3  # the training part is read, not tokenized


def test_export_gguf_adapter_and_its_refusals(trained_run, tiny_model, tmp_path, capsys):
    import gguf

    assert cli.main(["export", "--adapter", str(trained_run), "--format", "gguf"]) == 0
    out = capsys.readouterr().out
    written = trained_run / "adapter.gguf"
    assert "GGUF LoRA adapter written to" in out and "--lora" in out
    reader = gguf.GGUFReader(written)
    assert reader.fields["general.type"].contents() == "adapter"
    assert any(t.name.endswith(".lora_b") for t in reader.tensors)
    before = written.read_bytes()
    # nothing is silently overwritten; a directory, the base or an impossible combination: one line
    assert cli.main(["export", "--adapter", str(trained_run)]) == 2
    assert "exists" in error_line(capsys) and written.read_bytes() == before
    assert cli.main(["export", "--adapter", str(trained_run), "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--adapter", str(trained_run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in error_line(capsys)
    assert (
        cli.main(["export", "--adapter", str(trained_run), "--outtype", "q8_0", "--out", str(tmp_path / "x.gguf")]) == 2
    )
    assert "--merged" in error_line(capsys)
    assert cli.main(["export", "--adapter", str(trained_run), "--merged", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "convert_hf_to_gguf" in error_line(capsys)  # a Hugging Face directory base: no GGUF file to copy from
    assert cli.main(["export", "--adapter", str(tmp_path / "missing")]) == 2
    assert "does not exist" in error_line(capsys)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "m.gguf").exists()
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_an_error_that_a_ctrl_c_caused_is_still_an_interruption(monkeypatch, capsys):
    """A Ctrl-C that lands inside an extension module's import can surface as another error (numpy:
    "cannot load module more than once"): after a Ctrl-C, main exits with 130 and `interrupted`."""
    import os
    import signal

    import lorakit.cli as cli

    def command_hit_by_ctrl_c(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed inside the import, as numpy's init does
        raise ImportError("cannot load module more than once per process")

    before = signal.getsignal(signal.SIGINT)
    parser = cli.build_parser("inspect")
    monkeypatch.setattr(cli, "build_parser", lambda command: parser)
    monkeypatch.setattr(parser, "parse_args", lambda given: argparse.Namespace(func=command_hit_by_ctrl_c))
    assert cli.main(["inspect", "x"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # the handler main found is back

    def plain_bug(args):
        raise ImportError("a real import error")

    monkeypatch.setattr(parser, "parse_args", lambda given: argparse.Namespace(func=plain_bug))
    with pytest.raises(ImportError, match="a real import error"):  # without a Ctrl-C, not hidden
        cli.main(["inspect", "x"])
