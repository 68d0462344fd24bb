"""Encoding records as token ids: prompts and completions (with prompt templates and chat
templates), conversations with loss on the assistant's turns, plain text, and labels or numeric
targets for sequence tasks.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
import weakref
from dataclasses import dataclass
from typing import Any

from ...errors import LorakitError
from .records import FORMATS, IGNORE_INDEX, Record, Where, is_number


@dataclass
class Example:
    """Token ids ready to batch: `labels` for causal LMs (IGNORE_INDEX where no loss), or a
    `label` (a class index, or a float target for regression) for sequence tasks.
    `prompt`/`answer` are kept for exact-match evaluation; `token_type_ids` for sentence pairs."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | float | None = None
    prompt: str | None = None
    answer: str | None = None
    token_type_ids: list[int] | None = None


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


_LEADING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its leading special ids


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before every text: a BOS for Llama, Mistral or Gemma,
    none for GPT-2, Qwen or SmolLM (found once per tokenizer by encoding a probe with and without)."""
    try:
        return list(_LEADING[tokenizer])
    except (KeyError, TypeError):  # TypeError: an object that cannot be weakly referenced
        pass
    plain, full = _ids(tokenizer, "a", False), _ids(tokenizer, "a", True)
    lead = next(
        (full[:start] for start in range(len(full) - len(plain) + 1) if full[start : start + len(plain)] == plain), []
    )
    with contextlib.suppress(TypeError):
        _LEADING[tokenizer] = tuple(lead)
    return lead


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids a prompt (or a whole text) is trained on and generated from, in `lorakit train`, `eval`
    and `generate` alike: the tokenizer's leading special tokens (its BOS) once, then the text's own
    tokens. A text a chat template rendered with the BOS already in it (`{{ bos_token }}`) does not get
    a second one, and nothing the tokenizer would append (an EOS) closes it: a completion follows."""
    ids, lead = _ids(tokenizer, text, False), leading_special_ids(tokenizer)
    return ids if ids[: len(lead)] == lead else lead + ids


def prompt_completion_ids(
    tokenizer, prompt: str, completion: str, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """`prompt + completion + eos` ids and labels (prompt masked unless `train_on_prompt`)."""
    p = text_ids(tokenizer, prompt)
    c = _ids(tokenizer, completion, False)
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return p + c, (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + c


def chat_ids(tokenizer, messages: list[dict[str, str]], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """The conversation's ids with loss on assistant turns only.

    Each assistant turn's tokens are the difference between the rendering that ends with that
    turn and the rendering of the turns before it plus the generation prompt.
    """
    ids = text_ids(tokenizer, render_chat(tokenizer, messages, False))
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(text_ids(tokenizer, render_chat(tokenizer, messages[:i], True)))
        end = len(text_ids(tokenizer, render_chat(tokenizer, messages[: i + 1], False)))
        labels[start:end] = ids[start:end]
    return ids, labels


def check_prompt_template(template: str | None) -> None:
    """'chat', or a format string with at least one {column}; a one-line error otherwise."""
    if template is None or template == "chat":
        return
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise LorakitError(f"prompt_template {template!r}: {err} (write a literal brace as {{{{ or }}}})") from None
    if not names:
        raise LorakitError(
            f"prompt_template {template!r} uses no column: write e.g. 'Question: {{prompt}}\\nAnswer:', "
            "or 'chat' for the tokenizer's chat template"
        )
    bad = [n for n in names if not re.fullmatch(r"[^\[\].!:{}]+", n)]
    if bad:
        raise LorakitError(f"prompt_template {template!r}: {{{bad[0]}}} is not a plain column name")


def apply_prompt_template(template: str | None, record: Record, prompt: str, tokenizer) -> str:
    """The prompt the model sees: as given (no template), the tokenizer's chat rendering of it as
    a user turn ('chat'), or the template filled from the record's columns and roles."""
    if template is None:
        return prompt
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise LorakitError("--prompt-template chat needs a tokenizer with a chat template; this model's has none")
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], True)
    values = {**{k: v for k, v in record.columns.items() if v is not None}, **record.data, "prompt": prompt}
    try:
        return template.replace("\\n", "\n").format_map(values)
    except KeyError as err:
        raise LorakitError(
            f"{record.source}: the prompt template uses {{{err.args[0]}}}, but this record has no such "
            f"column; it has: {', '.join(sorted(values))}"
        ) from None


def to_prompt_completion(
    record: dict[str, Any] | Record, fmt: str, tokenizer, template: str | None = None
) -> tuple[str, str] | None:
    """(prompt text, completion text) for layouts that have one answer, else None."""
    if not isinstance(record, Record):
        record = Record(record, "record", {})
    data = record.data
    if fmt == "prompt-completion":
        return apply_prompt_template(template, record, data["prompt"], tokenizer), data["completion"]
    if fmt == "alpaca":
        instruction, input_text = data["instruction"], data.get("input") or ""
        if template is not None and template != "chat":
            return apply_prompt_template(template, record, instruction, tokenizer), data["output"]
        if has_chat_template(tokenizer):
            user = instruction + ("\n\n" + input_text if input_text else "")
            return render_chat(tokenizer, [{"role": "user", "content": user}], True), data["output"]
        return alpaca_prompt(instruction, input_text), data["output"]
    return None


def encode_causal(
    records: list[Record],
    fmt: str,
    tokenizer,
    max_length: int,
    train_on_prompt: bool,
    template: str | None = None,
    skipped: list[str] | None = None,
) -> list[Example]:
    """Token ids and labels for a causal LM. An example with no loss token left within `max_length`
    is an error, or, with a `skipped` list, left out and its place appended there."""
    if fmt == "label":
        raise LorakitError(
            f"{data_name(records)}: text + label data is for sequence tasks: add --task classify (or --task regress)"
        )
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise LorakitError("chat data needs a tokenizer with a chat template; this model's tokenizer has none")
    examples = []
    for record in records:
        pair = to_prompt_completion(record, fmt, tokenizer, template)
        if pair is not None:
            ids, labels = prompt_completion_ids(tokenizer, pair[0], pair[1], train_on_prompt)
        elif fmt == "chat":
            ids, labels = chat_ids(tokenizer, record.data["messages"], train_on_prompt)
        else:  # text
            ids = text_ids(tokenizer, record.data["text"])
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            if skipped is not None:
                skipped.append(str(record.source))
                continue
            raise LorakitError(
                f"{record.source}: no completion tokens left within max_length={max_length} (prompt is {len(ids)}+ tokens)"
            )
        examples.append(Example(ids, labels=labels, prompt=pair[0] if pair else None, answer=pair[1] if pair else None))
    return examples


def label_text(record: Record) -> str:
    """A class label as text ("1", "entailment", "true"); empty or multi-line labels are errors."""
    value = record.data.get("label")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LorakitError(f"{record.source}: label {value} is not a class")
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise LorakitError(f"{record.source}: empty label")
    if "\n" in text or "\r" in text:
        raise LorakitError(
            f"{record.source}: the label spans several lines ({text[:40]!r}...): a quote opened in "
            "this row is probably never closed"
        )
    return text


def data_name(records: list[Record]) -> str:
    """The file the records came from (for messages about the data as a whole)."""
    source = records[0].source if records else "data"
    return str(source.origin.path) if isinstance(source, Where) else str(source).split(":")[0]


def label_names(records: list[Record]) -> list[str]:
    """The sorted label set (numerically when every label is an integer)."""
    from decimal import Decimal

    labels = {label_text(r) for r in records}
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=Decimal)  # Decimal: no digit limit, unlike int()
    if all(is_number(label) for label in labels):
        raise LorakitError(
            f"{data_name(records)}: the labels are real numbers (e.g. "
            f"{sorted(labels, key=Decimal)[len(labels) // 2][:40]}): for a numeric target use --task regress"
        )
    return sorted(labels)


def _sequence_ids(tokenizer, record: Record, max_length: int) -> tuple[list[int], list[int] | None]:
    """Token ids of a text (or a sentence pair, with the tokenizer's pair encoding)."""
    pair = record.data.get("text_pair")
    enc = tokenizer(record.data["text"], pair, truncation=True, max_length=max_length)
    return enc["input_ids"], enc.get("token_type_ids")


def encode_classify(records: list[Record], fmt: str, tokenizer, max_length: int, labels: list[str]) -> list[Example]:
    """Token ids and label indices; a label outside `labels` is an error naming it."""
    if fmt != "label":
        raise LorakitError(f"{data_name(records)}: --task classify needs text + label data, got {fmt} {FORMATS[fmt]}")
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for record in records:
        label = label_text(record)
        if label not in index:
            raise LorakitError(f"{record.source}: label {label!r} is not among the training labels {labels}")
        ids, types = _sequence_ids(tokenizer, record, max_length)
        examples.append(Example(ids, label=index[label], token_type_ids=types))
    return examples


def regression_target(record: Record) -> float:
    value = record.data.get("label")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LorakitError(f"{record.source}: the target must be a number, got {value!r}")
    try:
        target = float(value)
    except (ValueError, OverflowError):
        raise LorakitError(
            f"{record.source}: the target {str(value)[:40]!r} is not a number (--task regress)"
        ) from None
    if not math.isfinite(target):
        raise LorakitError(f"{record.source}: the target {value!r} is not a finite number")
    return target


def encode_regress(records: list[Record], fmt: str, tokenizer, max_length: int) -> list[Example]:
    """Token ids and float targets (--task regress)."""
    if fmt != "label":
        raise LorakitError(
            f"{data_name(records)}: --task regress needs text + a numeric label or score column, got {fmt} {FORMATS[fmt]}"
        )
    examples = []
    for record in records:
        ids, types = _sequence_ids(tokenizer, record, max_length)
        examples.append(Example(ids, label=regression_target(record), token_type_ids=types))
    return examples
