"""Training data: reading files, recognising their format, turning records into token ids.

Formats, recognised from each record's keys (one format per file):

| format              | record                                               | loss on          |
|---------------------|------------------------------------------------------|------------------|
| alpaca              | {"instruction", "input"?, "output"}                  | output           |
| chat                | {"messages": [{"role", "content"}, ...]}             | assistant turns  |
| prompt-completion   | {"prompt", "completion"}                             | completion       |
| text                | {"text"}                                             | all tokens       |
| label (classify)    | {"text" or "sentence", "label"}; .tsv / .csv columns | the label        |

Files: `.jsonl` (one JSON object a line), `.json` (a list of objects), `.tsv` / `.csv` (a header
row, then one example a row). Problems name the file and line.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LorakitError

FORMATS = {
    "alpaca": "{instruction, input?, output}",
    "chat": "{messages: [{role, content}]}",
    "prompt-completion": "{prompt, completion}",
    "text": "{text}",
    "label": "{text or sentence, label}",
}
IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch's cross-entropy default)


@dataclass
class Record:
    """One example as read, with where it came from (for error messages)."""

    data: dict[str, Any]
    source: str  # "file:line"


def detect_format(keys: set[str]) -> str | None:
    """The format a record's keys belong to, or None."""
    if "messages" in keys and keys <= {"messages", "id"}:
        return "chat"
    if {"instruction", "output"} <= keys and keys <= {"instruction", "input", "output", "id"}:
        return "alpaca"
    if {"prompt", "completion"} <= keys and keys <= {"prompt", "completion", "id"}:
        return "prompt-completion"
    if "label" in keys and len(keys & {"text", "sentence"}) == 1 and keys <= {"text", "sentence", "label", "id"}:
        return "label"
    if keys <= {"text", "id"} and "text" in keys:
        return "text"
    return None


def read_records(path: str | Path) -> list[Record]:
    """The records of a data file, each checked to be an object; raises a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LorakitError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
                records.append(_checked_object(obj, f"{path}:{number}"))
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]} / {"train": [...]}
        if not isinstance(obj, list):
            raise LorakitError(f"{path}: expected a JSON list of examples, got {type(obj).__name__}")
        # Line numbers of a pretty-printed list are unknown; name the item instead.
        records = [_checked_object(o, f"{path}: item {i}") for i, o in enumerate(obj)]
    elif suffix in (".tsv", ".csv"):
        records = _read_table(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise LorakitError(f"{path}: unknown data file type {suffix!r} (use .jsonl, .json, .tsv or .csv)")
    if not records:
        raise LorakitError(f"{path}: no examples (the file is empty)")
    return records


def _checked_object(obj: Any, source: str) -> Record:
    if not isinstance(obj, dict):
        raise LorakitError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    return Record(obj, source)


def _read_table(path: Path, delimiter: str) -> list[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        # TSV files such as SST-2 contain bare quotes inside sentences: no quoting for TSV.
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        if "label" not in header or not ({"text", "sentence"} & set(header)):
            raise LorakitError(f"{path}:1: header {header} needs a 'label' column and a 'text' or 'sentence' column")
        text_col = "text" if "text" in header else "sentence"
        records = []
        for number, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise LorakitError(f"{path}:{number}: expected {len(header)} columns, found {len(row)}")
            cells = dict(zip(header, row))
            records.append(Record({"text": cells[text_col], "label": cells["label"].strip()}, f"{path}:{number}"))
    return records


def check_records(records: list[Record], path: str | Path) -> str:
    """The single format of all records; a one-line error on unknown, mixed or mistyped ones."""
    fmt = None
    for record in records:
        keys = set(record.data)
        this = detect_format(keys)
        if this is None:
            raise LorakitError(
                f"{record.source}: unknown record format with keys {sorted(keys)}; expected one of: "
                + "; ".join(f"{k} {v}" for k, v in FORMATS.items())
            )
        if fmt is None:
            fmt, first = this, record.source
        elif this != fmt:
            raise LorakitError(f"{record.source}: mixed formats in {path}: {first} is {fmt}, this line is {this}")
        _check_types(record, this)
    assert fmt is not None
    return fmt


def _check_types(record: Record, fmt: str) -> None:
    data, where = record.data, record.source
    if fmt == "chat":
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise LorakitError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LorakitError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise LorakitError(f"{where}: no assistant message to learn from")
        return
    for key, value in data.items():
        if key == "label":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise LorakitError(f"{where}: 'label' must be a string or an integer, got {type(value).__name__}")
        elif key != "id" and not isinstance(value, str):
            raise LorakitError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if fmt == "alpaca" and not data["output"].strip():
        raise LorakitError(f"{where}: empty 'output'")
    if fmt == "prompt-completion" and not data["completion"].strip():
        raise LorakitError(f"{where}: empty 'completion'")


# --- tokenization -------------------------------------------------------------------------------


@dataclass
class Example:
    """Token ids ready to batch: `labels` for causal LMs (IGNORE_INDEX where no loss), or an
    integer `label` for classification. `prompt`/`answer` are kept for exact-match evaluation."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    prompt: str | None = None
    answer: str | None = None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The classic Alpaca prompt, for tokenizers without a chat template."""
    if input_text:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            f"Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_completion_ids(tokenizer, prompt: str, completion: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """`prompt + completion + eos` ids and labels (prompt masked unless `train_on_prompt`)."""
    p = _ids(tokenizer, prompt, True)
    c = _ids(tokenizer, completion, False)
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return p + c, (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + c


def chat_ids(tokenizer, messages: list[dict[str, str]], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """The conversation's ids with loss on assistant turns only.

    Each assistant turn's tokens are the difference between the rendering that ends with that
    turn and the rendering of the turns before it plus the generation prompt.
    """
    ids = _ids(tokenizer, render_chat(tokenizer, messages, False), False)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render_chat(tokenizer, messages[:i], True), False))
        end = len(_ids(tokenizer, render_chat(tokenizer, messages[: i + 1], False), False))
        labels[start:end] = ids[start:end]
    return ids, labels


def to_prompt_completion(record: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str] | None:
    """(prompt text, completion text) for formats that have one answer, else None."""
    if fmt == "prompt-completion":
        return record["prompt"], record["completion"]
    if fmt == "alpaca":
        instruction, input_text = record["instruction"], record.get("input") or ""
        if has_chat_template(tokenizer):
            user = instruction + ("\n\n" + input_text if input_text else "")
            return render_chat(tokenizer, [{"role": "user", "content": user}], True), record["output"]
        return alpaca_prompt(instruction, input_text), record["output"]
    return None


def encode_causal(records: list[Record], fmt: str, tokenizer, max_length: int, train_on_prompt: bool) -> list[Example]:
    """Token ids and labels for a causal LM; examples with no loss token left are an error."""
    if fmt == "label":
        raise LorakitError("text + label data is for classification: add --task classify")
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise LorakitError("chat data needs a tokenizer with a chat template; this model's tokenizer has none")
    examples = []
    for record in records:
        pair = to_prompt_completion(record.data, fmt, tokenizer)
        if pair is not None:
            ids, labels = prompt_completion_ids(tokenizer, pair[0], pair[1], train_on_prompt)
        elif fmt == "chat":
            ids, labels = chat_ids(tokenizer, record.data["messages"], train_on_prompt)
        else:  # text
            ids = _ids(tokenizer, record.data["text"], True)
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise LorakitError(
                f"{record.source}: no completion tokens left within max_length={max_length} (prompt is {len(ids)}+ tokens)"
            )
        examples.append(Example(ids, labels=labels, prompt=pair[0] if pair else None, answer=pair[1] if pair else None))
    return examples


def label_names(records: list[Record]) -> list[str]:
    """The sorted label set (numerically when every label is an integer)."""
    labels = {str(r.data["label"]).strip() for r in records}
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def encode_classify(records: list[Record], fmt: str, tokenizer, max_length: int, labels: list[str]) -> list[Example]:
    """Token ids and label indices; a label outside `labels` is an error naming it."""
    if fmt != "label":
        raise LorakitError(f"--task classify needs text + label data, got {fmt} {FORMATS[fmt]}")
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for record in records:
        label = str(record.data["label"]).strip()
        if label not in index:
            raise LorakitError(f"{record.source}: label {label!r} is not among the training labels {labels}")
        text = record.data.get("text", record.data.get("sentence"))
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        examples.append(Example(ids, label=index[label]))
    return examples


def split_held_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random split into (train, held-out); both non-empty when there are 2+ records."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# --- batching -----------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, and labels (token or class)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples[0].labels is not None:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches the uninterrupted run would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def evenly_spaced(examples: list[Example], fraction: float) -> list[Example]:
    """About `fraction` of `examples` (at least one), taken at even intervals over the whole list, so
    the sample spans the data as it comes (all parts of a sorted or grouped file)."""
    count = max(1, min(len(examples), round(len(examples) * fraction)))
    return [examples[(i * len(examples)) // count] for i in range(count)]


def micro_batch(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """The `index`-th micro-batch of the endless seeded stream (epochs follow each other;
    the last partial batch of an epoch is dropped so every batch has `batch_size` examples)."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, position = divmod(index, per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    take = order[position * batch_size : (position + 1) * batch_size]
    if len(take) < batch_size:  # fewer examples than one batch: use them all
        take = order
    return [examples[i] for i in take]
