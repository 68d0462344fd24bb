"""Data formats: detection, loss masks, errors that name file and line, splits, batch order."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.errors import LorakitError
from lorakit.train import data, tasks
from tiny_lm import save_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "a"}]}, "chat"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"text": "t"}, "text"),
        ({"text": "t", "label": 1}, "label"),
        ({"text": "t", "text_pair": "u", "label": "pos"}, "label"),
        ({"text": "t", "text_pair": "u"}, None),
        ({"prompt": "p"}, None),
    ],
)
def test_detect_format(record, fmt):
    assert data.detect_format(set(record)) == fmt


def read(path, task="causal-lm"):
    records = data.read_records(path, task=task)
    return records, data.check_records(records, path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(LorakitError, match=r"d\.jsonl:3: invalid JSON"):
        read(path)


def test_wrong_type_names_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 5}])
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: 'completion' must be a string"):
        read(path)


def test_unknown_and_mixed_formats(tmp_path):
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"query": "q", "reply": "a"}])
    with pytest.raises(
        LorakitError, match=r"u\.jsonl:1: no known layout in the columns \['query', 'reply'\].*--columns"
    ):
        read(unknown)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(LorakitError, match=r"m\.jsonl:2: mixed layouts .* is text, this one is prompt-completion"):
        read(mixed)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(LorakitError, match="no examples"):
        read(tmp_path / "e.jsonl")


def test_json_list_and_tsv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 3))
    assert read(tmp_path / "a.json")[1] == "alpaca"
    # SST-2 style: tab separated, bare quotes inside sentences
    (tmp_path / "s.tsv").write_text('sentence\tlabel\nit \'s "great"\t1\nbad\t0\n')
    records, fmt = read(tmp_path / "s.tsv", task="classify")
    assert fmt == "label" and records[0].data == {"text": 'it \'s "great"', "label": "1"}
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\nfine\t1\ntoo\tmany\tcells\n")
    with pytest.raises(LorakitError, match=r"bad\.tsv:3: expected 2 columns, found 3"):
        read(tmp_path / "bad.tsv", task="classify")


def test_prompt_completion_loss_only_on_completion(tokenizer):
    ids, labels = data.prompt_completion_ids(tokenizer, "Answer:", " apple", train_on_prompt=False)
    n_prompt = len(tokenizer("Answer:")["input_ids"])
    assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    _, all_labels = data.prompt_completion_ids(tokenizer, "Answer:", " apple", train_on_prompt=True)
    assert all_labels == ids


def test_chat_loss_only_on_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "good dog"},
        {"role": "user", "content": "lazy"},
        {"role": "assistant", "content": "bad movie"},
    ]
    ids, labels = data.chat_ids(tokenizer, messages, train_on_prompt=False)
    learned = tokenizer.decode([i for i, l in zip(ids, labels) if l != data.IGNORE_INDEX])
    assert learned == "good dog<|im_end|>\nbad movie<|im_end|>\n"


def test_alpaca_uses_chat_template(tokenizer):
    prompt, completion = data.to_prompt_completion(
        {"instruction": "Do it", "input": "x", "output": "done"}, "alpaca", tokenizer
    )
    assert prompt == "<|im_start|>user\nDo it\n\nx<|im_end|>\n<|im_start|>assistant\n" and completion == "done"


def test_label_mismatch_and_label_order(tmp_path, tokenizer):
    train = [data.Record({"text": "a", "label": "10"}, "t:1"), data.Record({"text": "b", "label": "9"}, "t:2")]
    assert data.label_names(train) == ["9", "10"]
    held = [data.Record({"text": "c", "label": "7"}, "e.tsv:2")]
    with pytest.raises(LorakitError, match=r"e\.tsv:2: label '7' is not among the training labels \['9', '10'\]"):
        data.encode_classify(held, "label", tokenizer, 32, data.label_names(train))


def test_label_data_needs_classify_task(tokenizer):
    with pytest.raises(LorakitError, match="--task classify \\(or --task regress\\)"):
        data.encode_causal([data.Record({"text": "a", "label": 1}, "x")], "label", tokenizer, 32, False)


def test_split_is_disjoint_and_seeded():
    records = [data.Record({"text": str(i)}, str(i)) for i in range(50)]
    train, held = data.split_held_out(records, 0.2, seed=1)
    assert len(held) == 10 and not {r.source for r in train} & {r.source for r in held}
    assert [r.source for r in data.split_held_out(records, 0.2, seed=1)[1]] == [r.source for r in held]


def test_micro_batches_cover_each_epoch_once():
    examples = [data.Example([i], labels=[i]) for i in range(10)]
    first_epoch = [e.input_ids[0] for i in range(5) for e in data.micro_batch(examples, i, 2, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    second = [e.input_ids[0] for i in range(5, 10) for e in data.micro_batch(examples, i, 2, seed=3)]
    assert sorted(second) == list(range(10)) and second != first_epoch


def test_default_task_is_deterministic_and_disjoint():
    train, held = tasks.generate(seed=0)
    assert (train, held) == tasks.generate(seed=0)
    assert len(train) == 800 and len(held) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    words = held[0]["prompt"].removeprefix(tasks.INSTRUCTION).removesuffix("\nAnswer:").split()
    assert held[0]["completion"] == " " + " ".join(reversed(words))
    assert tasks.exact_match(held[0]["completion"] + "\nmore", held[0]["completion"])
