"""Data as users have it (issue: real data): GLUE sentence pairs, regression, any column names,
Parquet and `datasets` directories, byte-order marks and long fields, answer extraction, and the
one-line errors for what cannot be read."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from lorakit.train import LorakitError, TrainConfig, data, evaluate, loop, run_data, train
from tiny_lm import save_tiny_bert, save_tiny_llama, save_tokenizer, write_jsonl

WORDS = "the quick brown fox jumps over lazy dog good bad movie apple river stone cloud".split()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("bert"), wordpiece=True))


@pytest.fixture(scope="module")
def bert_tokenizer(bert):
    return AutoTokenizer.from_pretrained(bert)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def quiet(*_):
    pass


def records(path, task="causal-lm", columns=None, split=None):
    found = data.read_records(path, columns, task, split)
    return found, data.check_records(found, path)


def sentence(i: int, n: int = 3) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


# --- layouts ------------------------------------------------------------------------------------


def test_rte_pairs_with_string_labels_use_the_pair_encoding(tmp_path, bert_tokenizer):
    rows = [
        {
            "idx": i,
            "sentence1": sentence(i),
            "sentence2": sentence(i + 1),
            "label": "entailment" if i % 2 else "not_entailment",
        }
        for i in range(6)
    ]
    found, fmt = records(write_jsonl(tmp_path / "rte.jsonl", rows), "classify")
    assert fmt == "label" and found[0].data == {
        "text": rows[0]["sentence1"],
        "text_pair": rows[0]["sentence2"],
        "label": "not_entailment",
    }
    labels = data.label_names(found)
    assert labels == ["entailment", "not_entailment"]
    examples = data.encode_classify(found, fmt, bert_tokenizer, 64, labels)
    reference = bert_tokenizer(rows[0]["sentence1"], rows[0]["sentence2"])
    assert examples[0].input_ids == reference["input_ids"] and examples[0].token_type_ids == reference["token_type_ids"]
    assert 1 in examples[0].token_type_ids  # the second sentence is marked, not glued onto the first
    batch = data.collate(examples[:2], bert_tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and batch["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("columns", [("question", "sentence"), ("question1", "question2"), ("premise", "hypothesis")])
def test_other_glue_pair_layouts_are_recognised(tmp_path, columns):
    first, second = columns
    rows = [{first: sentence(i), second: sentence(i + 2), "label": i % 3} for i in range(4)]
    found, _ = records(write_jsonl(tmp_path / "pairs.jsonl", rows), "classify")
    assert found[1].data == {"text": rows[1][first], "text_pair": rows[1][second], "label": 1}


def test_mrpc_original_tsv_with_bom_and_bare_quotes(tmp_path):
    text = (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness "\tReferring to him as only " the witness "\n'
        "0\t2108705\t2108831\tYucaipa owned Dominick 's\tYucaipa bought Dominick 's in 1995\n"
    )
    (tmp_path / "msr_paraphrase_train.txt.tsv").write_text(text, encoding="utf-8")
    found, fmt = records(tmp_path / "msr_paraphrase_train.txt.tsv", "classify")
    assert fmt == "label" and len(found) == 2
    assert found[0].data == {
        "text": 'Amrozi accused his brother , whom he called " the witness "',
        "text_pair": 'Referring to him as only " the witness "',
        "label": "1",
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    rows = [{"text": "good movie", "label": "1"}, {"text": "bad movie", "label": "0"}]
    if suffix == ".jsonl":
        body = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        body = json.dumps(rows)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        body = f"text{sep}label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    found, _ = records(path, "classify")
    assert [r.data for r in found] == rows


def test_a_field_longer_than_pythons_csv_limit_is_read(tmp_path):
    import csv

    long_text = "word " * (csv.field_size_limit() // 4)
    (tmp_path / "long.csv").write_text(f'text,label\n"{long_text}",1\nshort,0\n')
    found, _ = records(tmp_path / "long.csv", "classify")
    assert found[0].data["text"] == long_text and found[1].data == {"text": "short", "label": "0"}


def test_csv_cells_are_taken_as_written(tmp_path):
    # no "NA"/"null" -> missing, no "007" -> 7: every cell is text until its meaning is known
    (tmp_path / "raw.csv").write_text("text,label\nNA,007\nnull,1\n")
    found, _ = records(tmp_path / "raw.csv", "classify")
    assert [r.data for r in found] == [{"text": "NA", "label": "007"}, {"text": "null", "label": "1"}]


def test_parquet_and_arrow_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}", "extra": i} for i in range(5)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "train.parquet"))
    found, fmt = records(tmp_path / "train.parquet")
    assert fmt == "prompt-completion" and [r.data for r in found] == [
        {"prompt": r["prompt"], "completion": r["completion"]} for r in rows
    ]
    assert str(found[3].source).endswith("train.parquet: row 3")


def test_save_to_disk_directories_and_their_splits(tmp_path, bert):
    datasets = pytest.importorskip("datasets")
    train_rows = [{"sentence": sentence(i), "label": i % 2, "idx": i} for i in range(24)]
    dev_rows = [{"sentence": sentence(i + 50), "label": (i + 1) % 2, "idx": i} for i in range(5)]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train_rows), "validation": datasets.Dataset.from_list(dev_rows)}
    )
    dd.save_to_disk(str(tmp_path / "sst2"))
    datasets.Dataset.from_list(dev_rows).save_to_disk(str(tmp_path / "single"))

    found, _ = records(tmp_path / "sst2", "classify")
    assert len(found) == 24 and found[0].data == {"text": train_rows[0]["sentence"], "label": 0}
    assert len(records(tmp_path / "sst2", "classify", split="validation")[0]) == 5
    assert len(records(tmp_path / "single", "classify")[0]) == 5
    with pytest.raises(LorakitError, match=r"sst2 has no split 'test'; its splits: train, validation"):
        records(tmp_path / "sst2", "classify", split="test")
    with pytest.raises(LorakitError, match="single saved dataset without splits: drop --split"):
        records(tmp_path / "single", "classify", split="train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LorakitError, match=r"plain is a directory but not a dataset written by save_to_disk"):
        records(tmp_path / "plain", "classify")

    # a DatasetDict with a validation split: that split is the held-out set, scored whole
    tokenizer = AutoTokenizer.from_pretrained(bert)
    cfg = TrainConfig(model=bert, task="classify", data=str(tmp_path / "sst2"), max_eval_examples=3)
    built = loop.build_datasets(cfg, tokenizer)
    assert len(built.train) == 24 and len(built.eval) == 3 and built.eval_total == 5
    assert loop.describe_eval(built) == f"accuracy on 3 of 5 held-out examples ({tmp_path / 'sst2'} (split validation))"


def test_several_files_by_list_or_glob_and_errors_name_the_right_file(tmp_path):
    for part in range(3):
        write_jsonl(tmp_path / f"part-{part}.jsonl", [{"text": f"part {part} line {i}"} for i in range(2)])
    by_glob, _ = records(str(tmp_path / "part-*.jsonl"))
    assert [r.data["text"] for r in by_glob] == [f"part {p} line {i}" for p in range(3) for i in range(2)]
    listed, _ = records(f"{tmp_path / 'part-2.jsonl'},{tmp_path / 'part-0.jsonl'}")
    assert listed[0].data["text"] == "part 2 line 0" and len(listed) == 4
    (tmp_path / "part-1.jsonl").write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(LorakitError, match=r"part-1\.jsonl:3: 'text' must be a string, got int"):
        records(str(tmp_path / "part-*.jsonl"))
    with pytest.raises(LorakitError, match=r"data pattern .*nothing-\*\.jsonl matches no file"):
        records(str(tmp_path / "nothing-*.jsonl"))


# --- column mapping -----------------------------------------------------------------------------


def test_gsm8k_and_dolly_columns_need_no_mapping(tmp_path):
    gsm = write_jsonl(
        tmp_path / "gsm8k.jsonl", [{"question": "Natalia sold 48 clips. How many?", "answer": "48/2 = 24\n#### 72"}]
    )
    found, fmt = records(gsm)
    assert fmt == "prompt-completion" and found[0].data["completion"].endswith("#### 72")
    dolly = write_jsonl(
        tmp_path / "dolly.jsonl",
        [{"instruction": "Summarise", "context": "A text.", "response": "Short.", "category": "summarization"}],
    )
    found, fmt = records(dolly)
    assert fmt == "alpaca" and found[0].data == {"instruction": "Summarise", "input": "A text.", "output": "Short."}


def test_columns_map_any_names_and_wrong_mappings_are_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"query": "2+2?", "reply": "4", "source": "web"}])
    found, fmt = records(path, columns={"prompt": "query", "completion": "reply"})
    assert fmt == "prompt-completion" and found[0].data == {"prompt": "2+2?", "completion": "4"}
    mapped, summary = data.map_columns(
        data.read_table(path), {"prompt": "query", "completion": "reply"}, "causal-lm", path
    )
    assert data.describe_mapping(summary) == "prompt=query, completion=reply (ignored: source)"
    with pytest.raises(
        LorakitError,
        match=r"--columns names \['answer'\], which the data does not have; its columns: query, reply, source",
    ):
        records(path, columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(LorakitError, match=r"--columns: 'question' is not one of lorakit's columns"):
        records(path, columns={"question": "query"})
    assert data.parse_columns("prompt=question, completion=answer") == {"prompt": "question", "completion": "answer"}
    with pytest.raises(LorakitError, match="--columns expects ROLE=COLUMN"):
        data.parse_columns("prompt")


def test_columns_from_yaml_and_flags(tmp_path):
    from lorakit.cli import build_parser, resolve_train_config

    (tmp_path / "run.yaml").write_text("columns:\n  text: '#1 String'\n  text_pair: '#2 String'\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--columns", "label=Quality"])
    assert resolve_train_config(args).columns == {"label": "Quality"}  # a flag replaces the file's mapping
    args = build_parser().parse_args(["train", "--columns", "text=a,label=b", "--columns", "text_pair=c"])
    assert resolve_train_config(args).columns == {"text": "a", "label": "b", "text_pair": "c"}


# --- labels and regression -----------------------------------------------------------------------


def test_stsb_regression_targets(tmp_path, bert_tokenizer):
    (tmp_path / "stsb.tsv").write_text(
        "index\tgenre\tsentence1\tsentence2\tscore\n"
        "0\tmain\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
        "1\tmain\tA man is playing a flute.\tA man is eating.\t0.5\n"
    )
    found, fmt = records(tmp_path / "stsb.tsv", "regress")
    examples = data.encode_regress(found, fmt, bert_tokenizer, 64)
    assert [e.label for e in examples] == [5.0, 0.5] and examples[0].token_type_ids is not None
    batch = data.collate(examples, 0)
    assert batch["labels"].dtype == torch.float32
    with pytest.raises(LorakitError, match="the labels are real numbers .*use --task regress"):
        data.label_names(found)
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\thigh\n")
    found, fmt = records(tmp_path / "bad.tsv", "regress")
    with pytest.raises(LorakitError, match=r"bad\.tsv:3: the target 'high' is not a number \(--task regress\)"):
        data.encode_regress(found, fmt, bert_tokenizer, 64)


def test_many_classes_and_integer_or_boolean_labels(tmp_path):
    found, _ = records(
        write_jsonl(tmp_path / "c.jsonl", [{"text": sentence(i), "label": i % 7} for i in range(14)]), "classify"
    )
    assert data.label_names(found) == [str(i) for i in range(7)]
    found, _ = records(
        write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": True}, {"text": "y", "label": False}]), "classify"
    )
    assert data.label_names(found) == ["false", "true"]


def test_empty_and_multiline_labels_name_their_line(tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\ngood,1\nbad,\n")
    found, _ = records(tmp_path / "empty.csv", "classify")
    with pytest.raises(LorakitError, match=r"empty\.csv:3: empty label"):
        data.label_names(found)
    # a quote that opens in a label and closes rows later swallows them into one label
    (tmp_path / "swallow.csv").write_text('text,label\ngood,1\nbad,"0\nworse,0\nugly,1"\nfine,1\n')
    found, _ = records(tmp_path / "swallow.csv", "classify")
    with pytest.raises(LorakitError, match=r"swallow\.csv:3: the label spans several lines .*never closed"):
        data.label_names(found)


# --- bad files: one line naming the place ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "latin1.jsonl",
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)",
        ),
        ("latin1.csv", b"text,label\nok,1\ncaf\xe9,0\n", r"latin1\.csv:3: not UTF-8 text"),
        (
            "utf16.jsonl",
            '{"text": "ok"}\n'.encode("utf-16"),
            r"utf16\.jsonl: the file is UTF-16/32 encoded; lorakit reads UTF-8",
        ),
        (
            "unterminated.csv",
            b'text,label\ngood,1\n"bad,0\nworse,0\n',
            r"unterminated\.csv:3: a quote opened on this line is never closed",
        ),
        ("ragged.csv", b"text,label\ngood,1\nbad,0,extra\n", r"ragged\.csv:3: expected 2 columns, found 3"),
        ("broken.jsonl", b'{"text": "a"}\n\n{"text": }\n', r"broken\.jsonl:3: invalid JSON"),
        ("array.jsonl", b'{"text": "a"}\n[1, 2]\n', r"array\.jsonl:2: expected a JSON object, got list"),
        ("deep.jsonl", b'{"text": "a", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", r"deep\.jsonl"),
        ("list.json", b'[{"text": "a"}, 3]', r"list\.json: item 1: expected a JSON object, got int"),
        ("empty.csv", b"", r"empty\.csv: no examples"),
        ("blank.jsonl", b"\n  \n", r"blank\.jsonl: no examples"),
        ("bad.parquet", b"PAR1 not really", r"bad\.parquet: not a readable Parquet file"),
        ("notes.txt", b"hello", r"notes\.txt: unknown data file type '\.txt'"),
    ],
)
def test_unreadable_files_are_one_line_naming_the_place(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LorakitError, match=message) as caught:
        records(tmp_path / name, "classify")
    assert "\n" not in str(caught.value)


def test_chat_without_a_user_turn_and_classify_without_labels(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(LorakitError, match=r"chat\.jsonl:1: the conversation needs a user \(or system\) turn"):
        records(chat)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a"}, {"text": "b"}])
    found, fmt = records(texts, "classify")
    with pytest.raises(LorakitError, match=r"--task classify needs text \+ label data, got text"):
        data.encode_classify(found, fmt, None, 8, ["0", "1"])


# --- prompt templates ---------------------------------------------------------------------------


def test_prompt_templates(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "4\n#### 4", "level": "easy"}])
    found, fmt = records(path)
    assert data.to_prompt_completion(found[0], fmt, bpe_tokenizer) == ("2+2?", "4\n#### 4")  # as given
    assert (
        data.to_prompt_completion(found[0], fmt, bpe_tokenizer, "Q ({level}): {question}\\nA: ")[0]
        == "Q (easy): 2+2?\nA: "
    )
    assert data.to_prompt_completion(found[0], fmt, bpe_tokenizer, "{prompt} =")[0] == "2+2? ="
    chat = data.to_prompt_completion(found[0], fmt, bpe_tokenizer, "chat")[0]
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(
        LorakitError, match=r"gsm\.jsonl:1: the prompt template uses \{topic\}, but this record has no such column"
    ):
        data.to_prompt_completion(found[0], fmt, bpe_tokenizer, "{topic}: {question}")
    for bad, message in [
        ("no fields", "uses no column"),
        ("{question", "Single '{'|expected '}'"),
        ("{a.b}", "not a plain column name"),
    ]:
        with pytest.raises(LorakitError, match=message):
            data.check_prompt_template(bad)


# --- metrics end to end ---------------------------------------------------------------------------


def test_answer_extraction_scores_the_final_answer(monkeypatch, bpe_tokenizer):
    examples = [data.Example([1], prompt=f"q{i}", answer=f"work {i}\n#### {i * 10}") for i in range(4)]
    generated = ["so #### 0", "it is 10.0 #### 10.0", "#### 21", "no answer"]
    monkeypatch.setattr(evaluate, "greedy_completions", lambda *args, **kwargs: generated)
    scored = evaluate.exact_match(None, bpe_tokenizer, examples, 4, torch.device("cpu"), False, "gsm8k")
    assert scored == {"exact_match": 0.5}
    whole = evaluate.exact_match(None, bpe_tokenizer, examples, 4, torch.device("cpu"), False)
    assert whole == {"exact_match": 0.0}


def test_pairs_train_and_report_the_task_metrics(tmp_path, bert):
    rows = [
        {"sentence1": sentence(i), "sentence2": sentence(i + i % 2), "label": "same" if i % 2 == 0 else "different"}
        for i in range(40)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = TrainConfig(
        model=bert,
        task="classify",
        data=str(tmp_path / "pairs.jsonl"),
        out_dir=str(tmp_path),
        name="pairs",
        steps=4,
        batch_size=4,
        progress=False,
        metric="f1",
        eval_fraction=0.25,
        max_eval_examples=6,
    )
    result = train(cfg, echo=quiet)
    assert result.metric == "f1" and {"accuracy", "f1", "mcc", "eval_loss"} <= result.after.keys()
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["labels"] == ["different", "same"] and report["eval_examples"]["scored"] == 6
    assert report["eval_examples"]["of"] == 10


def test_regression_trains_one_output_with_mse(tmp_path, bert):
    rows = [{"sentence1": sentence(i), "sentence2": sentence(i + 1), "score": str(i % 5 + 0.5)} for i in range(24)]
    write_jsonl(tmp_path / "stsb.jsonl", rows)
    cfg = TrainConfig(
        model=bert,
        task="regress",
        data=str(tmp_path / "stsb.jsonl"),
        out_dir=str(tmp_path),
        name="sts",
        steps=3,
        batch_size=4,
        progress=False,
    )
    result = train(cfg, echo=quiet)
    assert result.metric == "pearson" and {"pearson", "spearman", "eval_loss"} <= result.after.keys()
    from safetensors.torch import load_file

    head = [
        v
        for k, v in load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors")).items()
        if k.endswith("classifier.weight")
    ]
    assert len(head) == 1 and head[0].shape[0] == 1


def test_generation_with_answer_pattern_trains_and_evaluates(tmp_path):
    model = str(save_tiny_llama(tmp_path / "llama"))
    rows = [{"question": f"{WORDS[i % 8]} plus one?", "answer": f"so {i % 8 + 1}\n#### {i % 8 + 1}"} for i in range(20)]
    write_jsonl(tmp_path / "gsm.jsonl", rows)
    cfg = TrainConfig(
        model=model,
        data=str(tmp_path / "gsm.jsonl"),
        out_dir=str(tmp_path),
        name="gsm",
        steps=2,
        batch_size=4,
        progress=False,
        answer_pattern="gsm8k",
        prompt_template="Question: {question}\\nAnswer: ",
    )
    result = train(cfg, echo=quiet)
    assert result.metric == "exact_match" and {"exact_match", "eval_loss", "perplexity"} <= result.after.keys()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"metric": "pearson"}, "metric 'pearson' does not apply to --task causal-lm"),
        ({"task": "classify", "metric": "exact_match"}, "does not apply to --task classify"),
        ({"answer_pattern": "(a)(b)"}, "answer_pattern:.*group"),
        ({"answer_pattern": "gsm8k", "metric": "eval_loss"}, "answer_pattern scores exact_match"),
        ({"prompt_template": "nothing"}, "uses no column"),
        ({"columns": {"sentence": "x"}}, "'sentence' is not one of lorakit's columns"),
        ({"eval_batch_size": 0}, "eval_batch_size must be positive"),
    ],
)
def test_data_settings_are_checked_before_loading(fields, message):
    with pytest.raises(LorakitError, match=message):
        loop.check_config(TrainConfig(**fields))


def test_hostile_leftovers(tmp_path):
    (tmp_path / "header_only.csv").write_text("text,label\n")
    with pytest.raises(LorakitError, match=r"header_only\.csv: no examples \(a header row and nothing else\)"):
        records(tmp_path / "header_only.csv", "classify")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(LorakitError, match="--eval-split validation picks a split of a saved dataset directory"):
        data.read_table(one, "validation", "--eval-split")
    with pytest.raises(LorakitError, match="the data path is empty"):
        data.read_table("  ")


# --- files without a header row ---------------------------------------------------------------------

COLA = (
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
    "gj04\t0\t*\tThey drank the pub.\n"
    'cj99\t1\t\tThe more you eat, the "less" you want.\n'
    "cj99\t0\t??\tBill floated into the cave the boat.\n"
)


def test_cola_is_read_as_glue_ships_it(tmp_path):
    (tmp_path / "train.tsv").write_text(COLA)
    found, fmt = records(tmp_path / "train.tsv", "classify")
    assert fmt == "label" and len(found) == 4
    assert found[1].data == {"text": "They drank the pub.", "label": "0"}
    assert found[2].data["text"] == 'The more you eat, the "less" you want.'
    assert str(found[3].source).endswith("train.tsv:4")  # no header row: record 3 is on line 4
    _, summary = data.map_columns(data.read_table(tmp_path / "train.tsv"), {}, "classify", "train.tsv")
    assert data.describe_mapping(summary) == "label=label, text=sentence (ignored: source, original_label)"


def test_cola_trains_from_the_command_line(tmp_path, bert, capsys):
    from lorakit import cli

    (tmp_path / "train.tsv").write_text(COLA * 3)
    (tmp_path / "dev.tsv").write_text(COLA)
    code = cli.main(
        [
            "train",
            "--task",
            "classify",
            "--model",
            bert,
            "--data",
            str(tmp_path / "train.tsv"),
            "--eval-data",
            str(tmp_path / "dev.tsv"),
            "--metric",
            "mcc",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out-dir",
            str(tmp_path),
            "--name",
            "cola",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "cola" / "report.json").read_text())["labels"] == ["0", "1"]


def test_columns_by_position_read_a_file_without_a_header(tmp_path):
    (tmp_path / "plain.tsv").write_text("7\tpositive\tgood movie\n8\tnegative\tbad movie\n9\t\tugly movie\n")
    with pytest.raises(
        LorakitError,
        match=r"plain\.tsv:1: the file has no header row \(its first row is data: 1='7', 2='positive', 3='good movie'\); .*--columns text=N,label=M",
    ) as caught:
        records(tmp_path / "plain.tsv", "classify")
    assert "\n" not in str(caught.value)
    found, fmt = records(tmp_path / "plain.tsv", "classify", columns={"text": "3", "label": "2"})
    assert fmt == "label" and found[0].data == {"text": "good movie", "label": "positive"}
    with pytest.raises(LorakitError, match=r"plain\.tsv:3: empty label"):
        data.label_names(found)  # lines count from 1: the first row is data
    cfg = TrainConfig(task="classify", data=str(tmp_path / "plain.tsv"), columns={"text": "3", "label": "2"})
    found, fmt, mapping = run_data._records(cfg.data, cfg, None)  # what train and eval read
    assert len(found) == 3 and mapping == "text=3, label=2 (ignored: 1)"
    (tmp_path / "plain.csv").write_text(
        "good movie,positive\nbad movie,negative\n"
    )  # nothing looks like data: positions still read it
    found, _ = records(tmp_path / "plain.csv", "classify", columns={"text": "1", "label": "2"})
    assert [r.data["label"] for r in found] == ["positive", "negative"]
    with pytest.raises(LorakitError, match=r"--columns: name every column by position .* or every one by name"):
        records(tmp_path / "plain.tsv", "classify", columns={"text": "3", "label": "label"})
    with pytest.raises(LorakitError, match=r"plain\.tsv: --columns names column 5, but the file has 3 columns"):
        records(tmp_path / "plain.tsv", "classify", columns={"text": "5", "label": "2"})
    with pytest.raises(LorakitError, match=r"--columns: positions count from 1"):
        records(tmp_path / "plain.tsv", "classify", columns={"text": "0", "label": "2"})
    write_jsonl(tmp_path / "rows.jsonl", [{"a": "good movie", "b": "1"}])
    with pytest.raises(
        LorakitError, match=r"rows\.jsonl: --columns by position is for CSV/TSV files without a header row"
    ):
        records(tmp_path / "rows.jsonl", "classify", columns={"text": "1", "label": "2"})


def test_a_header_with_an_unnamed_column_is_read(tmp_path):
    # pandas' to_csv writes its index as a column without a name
    (tmp_path / "pandas.csv").write_text(",text,label\n0,good movie,1\n1,bad movie,0\n")
    found, fmt = records(tmp_path / "pandas.csv", "classify")
    assert fmt == "label" and [r.data for r in found] == [
        {"text": "good movie", "label": "1"},
        {"text": "bad movie", "label": "0"},
    ]
