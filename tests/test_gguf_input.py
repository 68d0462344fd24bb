"""GGUF bases as users may have them: a header that disagrees with the tensors, a tokenizer that
cannot be built, a base of other shapes than the adapter's; and what `lorakit export` tells the user
to run."""

from __future__ import annotations

import shlex

import pytest

from lorakit import cli
from lorakit.models import load_causal_lm
from tiny_lm import save_tiny_gguf, write_jsonl

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf bases")  # a space in the path: the printed command must quote it
    return {
        "base": save_tiny_gguf(d / "base.gguf"),
        "wide": save_tiny_gguf(d / "wide.gguf", hidden_size=64),
        "liar": save_tiny_gguf(d / "liar.gguf", header={"intermediate_size": 96}),
    }


@pytest.fixture(scope="module")
def run(bases, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    data = write_jsonl(
        d / "t.jsonl", [{"text": f"the {w} jumps over the lazy dog"} for w in "apple river stone cloud tiger".split()]
    )
    assert (
        cli.main(
            [
                "train",
                "--model",
                str(bases["base"]),
                "--data",
                str(data),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--out-dir",
                str(d),
                "--name",
                "r",
                "--no-progress",
                "--r",
                "4",
            ]
        )
        == 0
    )
    return d / "r"


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def test_a_header_that_disagrees_with_the_tensors_is_refused_at_load(bases):
    # the header states 96 feed-forward rows, the tensors have 64: loaded silently before, then a matmul failed
    with pytest.raises(
        ValueError,
        match=r"liar\.gguf: .*gate_proj\.weight is \(64, 32\) in the file but \(96, 32\) in the "
        r"model its header describes",
    ):
        load_causal_lm(str(bases["liar"]))


def test_the_commands_refuse_a_lying_header_in_one_line(bases, run, tmp_path, capsys):
    assert (
        cli.main(["train", "--model", str(bases["liar"]), "--steps", "1", "--out-dir", str(tmp_path), "--no-progress"])
        == 2
    )
    assert "liar.gguf" in one_error(capsys)
    assert (
        cli.main(
            [
                "export",
                "--adapter",
                str(run),
                "--merged",
                "--model",
                str(bases["liar"]),
                "--out",
                str(tmp_path / "m.gguf"),
            ]
        )
        == 2
    )
    assert "the file's settings and its tensors disagree" in one_error(capsys)


def test_merged_export_onto_a_base_of_other_shapes_is_one_line(bases, run, tmp_path, capsys):
    assert (
        cli.main(
            [
                "export",
                "--adapter",
                str(run),
                "--merged",
                "--model",
                str(bases["wide"]),
                "--out",
                str(tmp_path / "m.gguf"),
            ]
        )
        == 2
    )
    assert "does not fit this model" in one_error(capsys)
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_that_cannot_be_built_is_one_line(bases, run, tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    reader = gguf.GGUFReader(bases["base"])
    writer = gguf.GGUFWriter(str(broken), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.merges":
            value = ["zz qq"]  # a merge of tokens the vocabulary lacks: the tokenizers library refuses to build it
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data.reshape(tuple(reversed([int(n) for n in tensor.shape]))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert (
        cli.main(
            ["export", "--adapter", str(run), "--merged", "--model", str(broken), "--out", str(tmp_path / "m.gguf")]
        )
        == 2
    )
    assert "cannot build the tokenizer of" in one_error(capsys)
    assert cli.main(["generate", "--model", str(broken), "hello"]) == 2
    assert "cannot build the tokenizer of" in one_error(capsys)


def test_export_prints_the_base_file_it_used(bases, run, tmp_path, capsys):
    out = tmp_path / "adapter.gguf"
    assert cli.main(["export", "--adapter", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"llama-cli -m {shlex.quote(str(bases['base']))} --lora {shlex.quote(str(out))}" in printed
    assert "BASE.gguf" not in printed
