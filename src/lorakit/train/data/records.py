"""What every reader and encoder shares: the layouts and roles, where a record came from (a file and
line, named only when a message needs it), and the record itself.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = {
    "alpaca": "{instruction, input?, output}",
    "chat": "{messages: [{role, content}]}",
    "prompt-completion": "{prompt, completion}",
    "text": "{text}",
    "label": "{text, text_pair?, label}",
}
ROLES = ("prompt", "completion", "instruction", "input", "output", "messages", "text", "text_pair", "label")
IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch's cross-entropy default)
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".arrow": "arrow"}

# Column names of public data sets, mapped to lorakit's roles when the role's own name is absent.
# Pairs first: (first sentence, second sentence), as GLUE / SuperGLUE / SNLI name them.
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),  # RTE, MRPC, STS-B, WNLI
    ("question1", "question2"),  # QQP
    ("question", "sentence"),  # QNLI
    ("premise", "hypothesis"),  # MNLI, SNLI, ANLI
    ("#1 String", "#2 String"),  # MRPC's original TSV
)
TEXT_COLUMNS = ("sentence",)  # SST-2, CoLA
LABEL_COLUMNS = ("Quality", "score", "gold_label")  # MRPC's original TSV; STS-B's; MNLI's original
GENERATION_COLUMNS = (
    {"question": "prompt", "answer": "completion"},  # GSM8K and most QA sets
    {"context": "input", "response": "output"},  # Dolly (with its instruction)
)
KNOWN_COLUMNS = {"pairs": PAIR_COLUMNS, "text": TEXT_COLUMNS, "label": LABEL_COLUMNS, "generation": GENERATION_COLUMNS}


@dataclass(eq=False)
class Origin:
    """One data file (or a split of a saved dataset), for error messages."""

    path: Path
    kind: str  # a SUFFIXES value, or "saved"
    split: str | None = None
    _starts: list[int] | None = field(default=None, repr=False)
    headerless: bool = False  # a CSV/TSV file whose first row is data

    def describe(self, row: int) -> str:
        if self.kind in ("jsonl", "csv", "tsv"):
            starts = self._line_starts()
            if row < len(starts):
                return f"{self.path}:{starts[row]}"
        if self.kind == "json":
            return f"{self.path}: item {row}"
        split = f" (split {self.split})" if self.split else ""
        return f"{self.path}{split}: row {row}"

    def _line_starts(self) -> list[int]:
        """The line on which each record starts (computed once, only when a message needs it)."""
        if self._starts is None:
            with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as f:
                if self.kind == "jsonl":
                    self._starts = [n for n, line in enumerate(f, start=1) if line.strip()]
                else:
                    first = 1 if self.headerless else 2
                    self._starts = [
                        start
                        for start, row in _csv_rows(f, self.kind)
                        if start >= first and any(c.strip() for c in row)
                    ]
        return self._starts


class Where:
    """A record's place, rendered as `file:line` only when printed (most never are)."""

    __slots__ = ("origin", "row")

    def __init__(self, origin: Origin, row: int) -> None:
        self.origin, self.row = origin, row

    def __str__(self) -> str:
        return self.origin.describe(self.row)

    __repr__ = __str__


@dataclass
class Record:
    """One example: `data` holds lorakit's roles (ROLES), `columns` the row as the file has it
    (for prompt templates); `source` says where it came from."""

    data: dict[str, Any]
    source: Any  # str or Where: renders as "file:line"
    columns: dict[str, Any] = field(default_factory=dict)


def _csv_rows(f, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) of a CSV/TSV file, read as `datasets` reads it."""
    reader = csv.reader(
        f, delimiter="\t" if kind == "tsv" else ",", quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    )
    start = 1
    with _unlimited_csv_fields():
        for row in reader:
            yield start, row
            start = reader.line_num + 1


@contextlib.contextmanager
def _unlimited_csv_fields() -> Iterator[None]:
    previous = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def is_number(text: str) -> bool:
    """Whether a cell reads as a finite number (a regression target, or a data row's cell)."""
    try:
        return math.isfinite(float(text))
    except (ValueError, OverflowError):
        return False
