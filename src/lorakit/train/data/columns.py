"""Columns and layouts: which of a file's columns play lorakit's roles (given with `--columns`, or
recognised: lorakit's own names, then well-known public ones), the one layout of a file's records,
and the types each layout needs.
"""

from __future__ import annotations

from typing import Any

from ...errors import LorakitError, did_you_mean
from .records import FORMATS, GENERATION_COLUMNS, LABEL_COLUMNS, PAIR_COLUMNS, ROLES, TEXT_COLUMNS, Record, Where


def parse_columns(text: str) -> dict[str, str]:
    """`prompt=question,completion=answer` -> {"prompt": "question", "completion": "answer"}."""
    mapping = {}
    for part in (p for p in text.split(",") if p.strip()):
        role, sep, column = part.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise LorakitError(f"--columns expects ROLE=COLUMN[,ROLE=COLUMN...], got {part!r}")
        mapping[role.strip()] = column.strip()
    return mapping


def check_column_roles(mapping: dict[str, str]) -> None:
    for role, column in mapping.items():
        if role not in ROLES:
            raise LorakitError(
                f"--columns: {role!r} is not one of lorakit's columns ({', '.join(ROLES)}){did_you_mean(role, ROLES)}"
            )
        if not isinstance(column, str) or not column:
            raise LorakitError(
                f"--columns: the column for {role!r} must be a column name (or a position from 1, "
                f"written as a string: '4'), got {column!r}"
            )


def recognise_columns(columns: set[str], task: str, explicit: dict[str, str]) -> dict[str, str]:
    """role -> column: `explicit` first, then lorakit's own names, then well-known ones."""
    mapping = dict(explicit)
    taken = set(explicit.values())

    def offer(role: str, column: str) -> None:
        if role not in mapping and column in columns and column not in taken:
            mapping[role] = column
            taken.add(column)

    for role in ROLES:
        offer(role, role)
    if task in ("classify", "regress"):
        if "text" not in mapping:
            for first, second in PAIR_COLUMNS:
                if first in columns and second in columns and first not in taken and second not in taken:
                    offer("text", first)
                    offer("text_pair", second)
                    break
        for column in TEXT_COLUMNS:
            offer("text", column)
        for column in LABEL_COLUMNS:
            offer("label", column)
    else:
        for aliases in GENERATION_COLUMNS:
            for column, role in aliases.items():
                if role == "output" and "instruction" not in mapping:
                    continue
                offer(role, column)
    return mapping


def map_columns(
    records: list[Record], explicit: dict[str, str], task: str, spec: Any
) -> tuple[list[Record], dict[str, Any]]:
    """Records whose `data` holds lorakit's roles, and a summary {"mapping", "ignored"}.
    A column named in `explicit` that the data lacks is an error listing the data's columns."""
    check_column_roles(explicit)
    present: dict[str, None] = {}
    for record in records:
        present.update(dict.fromkeys(k for k, v in record.data.items() if v is not None))
    missing = [c for c in explicit.values() if c not in present]
    if missing:
        raise LorakitError(
            f"{spec}: --columns names {missing}, which the data does not have; its columns: "
            f"{', '.join(present)}{did_you_mean(missing[0], present)}"
        )
    mapping = recognise_columns(set(present), task, explicit)
    mapped = [
        Record(
            {role: record.data.get(column) for role, column in mapping.items() if record.data.get(column) is not None},
            record.source,
            record.data,
        )
        for record in records
    ]
    ignored = [c for c in present if c not in mapping.values()]
    return mapped, {"mapping": mapping, "ignored": ignored}


def describe_mapping(summary: dict[str, Any]) -> str:
    """`text=sentence1, text_pair=sentence2, label=label (ignored: idx)` for the run's log."""
    renamed = [f"{role}={column}" for role, column in summary["mapping"].items()]
    ignored = f" (ignored: {', '.join(summary['ignored'])})" if summary["ignored"] else ""
    return ", ".join(renamed) + ignored


def detect_format(keys: set[str]) -> str | None:
    """The layout a record's roles belong to, or None."""
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if {"text", "label"} <= keys:
        return "label"
    if "text" in keys and not keys & {"prompt", "completion", "instruction", "output", "text_pair"}:
        return "text"
    return None


def check_records(records: list[Record], path: Any) -> str:
    """The single layout of all records; a one-line error on unknown, mixed or mistyped ones."""
    fmt = None
    for record in records:
        keys = set(record.data)
        this = detect_format(keys)
        if this is None:
            columns = sorted(record.columns or record.data)
            empty = sorted(c for c, v in record.columns.items() if v is None)  # a null cell is no value
            if empty:
                raise LorakitError(
                    f"{record.source}: {', '.join(map(repr, empty))} empty (null) in this row, which leaves "
                    f"no known layout in its columns {sorted(c for c in columns if c not in empty)}"
                )
            raise LorakitError(
                f"{record.source}: no known layout in the columns {columns}; expected one of: "
                + "; ".join(f"{k} {v}" for k, v in FORMATS.items())
                + ". Map your columns with --columns ROLE=COLUMN (e.g. --columns prompt=question,completion=answer)"
                + (
                    "; a file without a header row by position, from 1 (e.g. --columns text=2,label=1)"
                    if isinstance(record.source, Where) and record.source.origin.kind in ("csv", "tsv")
                    else ""
                )
            )
        if fmt is None:
            fmt, first = this, record.source
        elif this != fmt:
            raise LorakitError(f"{record.source}: mixed layouts in {path}: {first} is {fmt}, this one is {this}")
        _check_types(record, this)
    if fmt is None:
        raise LorakitError(f"{path}: no examples")
    return fmt


def _check_text(value: str, key: str, where: Any) -> None:
    """Text a tokenizer can take: no lone surrogate (JSON's "\\ud800" escapes decode to one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LorakitError(
            f"{where}: '{key}' holds an invalid character ({value[err.start]!r}, a lone surrogate: "
            "an escape such as \\ud800 without its pair)"
        ) from None


def _check_types(record: Record, fmt: str) -> None:
    data, where = record.data, record.source
    if fmt == "chat":
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise LorakitError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LorakitError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            _check_text(m["content"], f"messages[{i}].content", where)
            _check_text(m["role"], f"messages[{i}].role", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise LorakitError(f"{where}: no assistant message to learn from")
        if messages[0]["role"] == "assistant" or not any(m["role"] in ("user", "system") for m in messages):
            raise LorakitError(f"{where}: the conversation needs a user (or system) turn before the assistant's")
        return
    for key, value in data.items():
        if key == "label":
            if not isinstance(value, (str, int, float, bool)):
                raise LorakitError(f"{where}: 'label' must be a string or a number, got {type(value).__name__}")
            if isinstance(value, str):
                _check_text(value, key, where)
        elif not isinstance(value, str):
            raise LorakitError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        else:
            _check_text(value, key, where)
    # An empty output or completion is kept (public sets have them: Alpaca's item 2335): its target
    # is the end-of-sequence token; `encode_causal` refuses it when the tokenizer has none.
    if fmt in ("label", "text") and not data["text"].strip():
        raise LorakitError(f"{where}: empty text")
