"""Training data: reading files, recognising their layout, turning records into token ids.

Files are read with Hugging Face `datasets` (offline, the library the ecosystem reads data with):
`.jsonl` / `.json` (JSON Lines, a JSON list, or one object holding the list), `.csv` / `.tsv`
(a header row; TSV cells are taken as written, quotes included, as GLUE's files need),
`.parquet`, `.arrow`, and directories written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
(pick a split with `split`). Several files: a comma-separated list or a glob (`data/train-*.parquet`).
A UTF-8 byte-order mark is accepted; other encodings are refused with the line of the first bad
byte. Problems name the file and line (JSON Lines, CSV/TSV), item (JSON lists) or row (the rest).

Layouts, recognised from each record's columns after `columns` mapping (one layout per file):

| layout              | columns                                              | learns            |
|---------------------|------------------------------------------------------|-------------------|
| alpaca              | instruction, input?, output                          | output            |
| chat                | messages: [{role, content}, ...]                     | assistant turns   |
| prompt-completion   | prompt, completion                                   | completion        |
| text                | text                                                 | all tokens        |
| label               | text, text_pair?, label (classify: a class; regress: a number) | the label |

Well-known column names are mapped without flags (`KNOWN_COLUMNS`): GLUE's sentence pairs
(`sentence1`/`sentence2`, `question`/`sentence`, `question1`/`question2`, `premise`/`hypothesis`,
MRPC's `#1 String`/`#2 String`/`Quality`), `sentence`, a `score` target, GSM8K's
`question`/`answer`, Dolly's `instruction`/`context`/`response`. Other columns are ignored (and
reported); `--columns ROLE=COLUMN,...` maps anything else.

CSV/TSV files without a header row: GLUE's CoLA is read as shipped (`COLA_COLUMNS`); any other such
file is named by position, `--columns text=4,label=2` (from 1), and a first row that holds a
number is refused as a header.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import json
import math
import random
import re
import string
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import LorakitError

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


# --- where a record came from -------------------------------------------------------------------


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
                    self._starts = [start for start, row in _csv_rows(f, self.kind) if start >= first and any(c.strip() for c in row)]
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


# --- reading ------------------------------------------------------------------------------------


def data_files(spec: str | Path) -> list[Path]:
    """The files (or saved-dataset directories) `spec` names: a path, a glob, or a comma-separated list."""
    spec = str(spec)
    if not spec.strip():
        raise LorakitError("the data path is empty")
    if Path(spec).exists():
        return [Path(spec)]
    found: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if any(c in part for c in "*?["):
            matches = sorted(glob.glob(part, recursive=True))
            if not matches:
                raise LorakitError(f"data pattern {part} matches no file")
            found += [Path(m) for m in matches]
        elif Path(part).exists():
            found.append(Path(part))
        else:
            raise LorakitError(f"data file {part} does not exist")
    if not found:
        raise LorakitError(f"no data file given in {spec!r}")
    return found


def read_table(spec: str | Path, split: str | None = None, split_flag: str = "--split",
               columns: dict[str, str] | None = None) -> list[Record]:
    """Every row of the data `spec` names, as records whose `data` is the row as stored (roles
    are assigned later by `map_columns`). Raises a one-line error naming the file. `columns` (the
    `--columns` mapping) naming columns by position reads CSV/TSV files as having no header row."""
    records: list[Record] = []
    positions = by_position(columns or {})
    for path in data_files(spec):
        for origin, rows in _read_source(path, split, split_flag, positions):
            records += [Record(row, Where(origin, i)) for i, row in enumerate(rows)]
    if not records:
        raise LorakitError(f"{spec}: no examples (the file is empty)")
    return records


def read_records(spec: str | Path, columns: dict[str, str] | None = None, task: str = "causal-lm",
                 split: str | None = None) -> list[Record]:
    """The records of `spec` with lorakit's roles assigned (`map_columns`)."""
    records, _ = map_columns(read_table(spec, split, columns=columns), columns or {}, task, spec)
    return records


def _read_source(path: Path, split: str | None, split_flag: str = "--split",
                 positions: list[int] | None = None) -> Iterator[tuple[Origin, list[dict[str, Any]]]]:
    kind = "saved" if path.is_dir() else SUFFIXES.get(path.suffix.lower())
    if positions and kind not in ("csv", "tsv"):
        raise LorakitError(f"{path}: --columns by position is for CSV/TSV files without a header row; name this file's "
                           "columns by name")
    if path.is_dir():
        yield _read_saved(path, split, split_flag)
        return
    if kind is None:
        raise LorakitError(f"{path}: unknown data file type {path.suffix!r} (use {', '.join(SUFFIXES)}, or a directory "
                           "written by datasets' save_to_disk)")
    if split is not None:
        raise LorakitError(f"{split_flag} {split} picks a split of a saved dataset directory; {path} is one file")
    _check_encoding_start(path, kind)
    names = _headerless_names(path, kind, positions) if kind in ("csv", "tsv") else None
    origin = Origin(path, kind, headerless=names is not None)
    if kind == "json":
        # One JSON document: `datasets` would parse it whole with ujson and hand the items to pyarrow,
        # which crashes (segfault, pyarrow 26) on an item that is not an object; Python's json reads
        # it the same way and names the item that is wrong.
        rows = _scan_json(path)
    elif kind == "jsonl" and not _arrow_reads_safely(path):
        # pyarrow's JSON reader also crashes on deeply nested values and on lines that are not
        # objects (`null`): such a file is read line by line, which names the bad line
        rows = _scan_jsonl(path)
    else:
        rows = _load_file(path, kind, names=names)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LorakitError(f"{origin.describe(i)}: expected an object, got {type(row).__name__}")
    yield origin, rows


MAX_ARROW_JSON_DEPTH = 256


def _arrow_reads_safely(path: Path) -> bool:
    """Whether pyarrow can be given this JSON Lines file: every non-blank line starts an object and
    nothing nests deeper than MAX_ARROW_JSON_DEPTH. One pass; the depth is an upper bound (brackets
    inside strings count too, so text can only make the file take the slower, safe reader)."""
    depth = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f):
            start = line.lstrip()
            if number == 0:
                start = start.removeprefix(codecs.BOM_UTF8).lstrip()
            if start and not start.startswith(b"{"):
                return False
            opens = line.count(b"[") + line.count(b"{")
            if depth + opens > MAX_ARROW_JSON_DEPTH:
                return False
            depth += opens - line.count(b"]") - line.count(b"}")
    return True


def _check_encoding_start(path: Path, kind: str) -> None:
    if kind in ("parquet", "arrow"):
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) \
            and not head.startswith(codecs.BOM_UTF8):
        raise LorakitError(f"{path}: the file is UTF-16/32 encoded; lorakit reads UTF-8 (convert it, e.g. "
                           f"iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix})")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """`datasets`, offline, without its progress bars and log lines (lorakit words its own errors)."""
    from ..models import _offline

    _offline()
    import datasets
    from datasets.utils import logging as ds_logging

    bars = not ds_logging.is_progress_bar_enabled() if hasattr(ds_logging, "is_progress_bar_enabled") else None
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    # Offline even when `datasets` was imported (by the user's code) before lorakit set the environment:
    # no Hub request, not even the download count it sends for every load_dataset otherwise.
    offline = {"HF_HUB_OFFLINE": True, "HF_DATASETS_OFFLINE": True, "HF_UPDATE_DOWNLOAD_COUNTS": False}
    saved = {key: getattr(datasets.config, key) for key in offline if hasattr(datasets.config, key)}
    for key in saved:
        setattr(datasets.config, key, offline[key])
    try:
        yield datasets
    finally:
        for key, value in saved.items():
            setattr(datasets.config, key, value)
        ds_logging.set_verbosity(level)
        if bars is False:
            datasets.enable_progress_bars()


def _load_file(path: Path, kind: str, field_name: str | None = None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one file through `datasets.load_dataset` (its cache in a temporary directory:
    the rows are kept in memory, and a user's cache should not fill with copies of every file).
    `names`: the column names of a CSV/TSV file without a header row."""
    builder, options = _builder(path, kind, names)
    if field_name is not None:
        options["field"] = field_name
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="lorakit-data-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **options)
            return table.to_list()
        except Exception as err:  # noqa: BLE001 -- datasets, pyarrow and pandas raise many types; each becomes one line
            failure = err
    if kind in ("jsonl", "json") and field_name is None and not _diagnose_encoding(path) and not _blank(path):
        # Valid JSON that `datasets` still refuses (datasets 5.2 fails on a column whose type changes
        # between lines when a blank line sits in between): read it line by line; a file that is
        # really broken raises here, at its line.
        return _scan_jsonl(path) if kind == "jsonl" else _scan_json(path)
    raise LorakitError(_diagnose(path, kind, failure))


def _builder(path: Path, kind: str, names: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    if kind in ("jsonl", "json"):
        return "json", {"encoding": "utf-8-sig"}
    if kind in ("csv", "tsv"):
        from datasets import Features, Value

        # Every cell as written: no type guessing ("007" stays "007"), no "NA"/"null" -> missing;
        # labels and targets are converted where their meaning is known.
        headerless = names is not None
        if names is None:
            # a column without a name (pandas' index) gets one; the names are given, replacing the header's
            names = [h or f"column {i}" for i, h in enumerate(_csv_header(path, kind), start=1)]
            duplicates = sorted({h for h in names if names.count(h) > 1})
            if duplicates:
                raise LorakitError(f"{path}:1: the header names {duplicates} more than once")
        options: dict[str, Any] = {
            "features": Features({name: Value("string") for name in names}), "keep_default_na": False,
            "na_filter": False, "encoding": "utf-8-sig", "column_names": names, "header": None if headerless else 0,
        }
        if kind == "tsv":
            options.update(sep="\t", quoting=csv.QUOTE_NONE)
        return "csv", options
    return kind, {}


def _csv_rows(f, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) of a CSV/TSV file, read as `datasets` reads it."""
    reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",", quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL)
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


def _csv_header(path: Path, kind: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for _, row in _csv_rows(f, kind):
                return [h.strip() for h in row]
    except UnicodeDecodeError:
        raise LorakitError(_diagnose_encoding(path) or f"{path}: not UTF-8 text") from None
    raise LorakitError(f"{path}: no examples (the file is empty)")


# GLUE's CoLA ships without a header row: source, label (0/1), the original mark (empty, "*", "?", "??",
# "#"), sentence.
COLA_COLUMNS = ["source", "label", "original_label", "sentence"]


def by_position(columns: dict[str, str]) -> list[int]:
    """The positions (from 1) `--columns` names columns by (`text=4,label=2`), or [] when it names
    them by name. A file whose columns are named by position has no header row."""
    positions = [c for c in columns.values() if isinstance(c, str) and c.strip().isdigit()]
    if not positions:
        return []
    if len(positions) != len(columns):
        raise LorakitError(f"--columns: name every column by position (text=4,label=2, for a file without a header row) "
                           f"or every one by name, not both: {columns}")
    if any(int(p) < 1 for p in positions):
        raise LorakitError(f"--columns: positions count from 1 (the first column is 1), got {columns}")
    return [int(p) for p in positions]


def _headerless_names(path: Path, kind: str, positions: list[int] | None) -> list[str] | None:
    """The column names of a CSV/TSV file that has no header row ("1", "2", ... when `--columns` names
    them by position; CoLA's own), or None when its first row is the header. A first row holding a
    number is data, not names: such a file needs `--columns` by position."""
    first = _csv_header(path, kind)
    if positions:
        if max(positions) > len(first):
            raise LorakitError(f"{path}: --columns names column {max(positions)}, but the file has {len(first)} columns")
        return [str(i) for i in range(1, len(first) + 1)]
    if kind == "tsv" and len(first) == 4 and first[1] in ("0", "1") and first[3] and first[0] and \
            not any(c.isspace() for c in first[0]) and not any(c.isalnum() for c in first[2]):
        return list(COLA_COLUMNS)
    if any(_is_number(cell) for cell in first):
        cells = ", ".join(f"{i}={cell[:30]!r}" for i, cell in enumerate(first, start=1))
        raise LorakitError(f"{path}:1: the file has no header row (its first row is data: {cells}); name its columns by "
                           "position, counted from 1, e.g. --columns text=N,label=M")
    return None


def _read_saved(path: Path, split: str | None, split_flag: str = "--split") -> tuple[Origin, list[dict[str, Any]]]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (ValueError, AttributeError):
            raise LorakitError(f"{path}/dataset_dict.json is not valid JSON") from None
        if split is None:
            if "train" not in splits and len(splits) != 1:
                raise LorakitError(f"{path} holds the splits {splits}: choose one with {split_flag}")
            split = "train" if "train" in splits else splits[0]
        if split not in splits:
            raise LorakitError(f"{path} has no split {split!r}; its splits: {', '.join(splits)}")
        target = path / split
    elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        if split is not None:
            raise LorakitError(f"{path} is a single saved dataset without splits: drop {split_flag} {split}")
        target = path
    else:
        raise LorakitError(f"{path} is a directory but not a dataset written by save_to_disk; give its data files "
                           f"(a glob works: {path}/*.parquet)")
    with _quiet_datasets() as datasets:
        try:
            rows = datasets.load_from_disk(str(target)).to_list()
        except Exception as err:  # noqa: BLE001 -- as in _load_file
            raise LorakitError(f"{target}: cannot read the saved dataset: {_first_line(err)}") from None
    return Origin(path, "saved", split), rows


def saved_splits(spec: str | Path) -> list[str]:
    """The splits of a saved DatasetDict directory (empty for anything else)."""
    path = Path(spec)
    try:
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    except (OSError, ValueError, AttributeError):
        return []


# --- turning a reader's exception into one line that names the place -----------------------------


def _first_line(err: BaseException) -> str:
    while err.__cause__ is not None and str(err).startswith("An error occurred while generating"):
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def _diagnose(path: Path, kind: str, err: Exception) -> str:
    """What is wrong with a file `datasets` could not read, at the line where it is wrong."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OSError) and getattr(cause, "errno", None) == 28:
        return f"{path}: the disk is full (reading data needs room for a temporary copy in {tempfile.gettempdir()})"
    if kind in ("parquet", "arrow"):
        return f"{path}: not a readable {kind.capitalize()} file ({_first_line(err)})"
    found = _diagnose_encoding(path)
    if found:
        return found
    if _blank(path):
        return f"{path}: no examples (the file is empty)"
    found = _diagnose_csv(path, kind) if kind in ("csv", "tsv") else None
    if found is None and kind in ("csv", "tsv") and "corresponds to no data" in _first_line(err):
        return f"{path}: no examples (a header row and nothing else)"
    return found or f"{path}: cannot read it as {kind.upper()}: {_first_line(err)}"


def _blank(path: Path) -> bool:
    with open(path, "rb") as f:
        return all(not chunk.strip() for chunk in iter(lambda: f.read(1 << 20).replace(codecs.BOM_UTF8, b""), b""))


def _diagnose_encoding(path: Path) -> str | None:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1}); lorakit "
                        f"reads UTF-8: convert the file, e.g. iconv -f latin1 -t UTF-8")
    return None


def _scan_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file, or a one-line error at the first line that is not one."""
    found = _diagnose_encoding(path)
    if found:
        raise LorakitError(found)
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LorakitError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise LorakitError(f"{path}:{number}: JSON nested too deeply") from None
            except ValueError as err:  # e.g. an integer of more digits than Python converts
                raise LorakitError(f"{path}:{number}: {' '.join(str(err).split())[:200]}") from None
            if not isinstance(obj, dict):
                raise LorakitError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def _scan_json(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON list (or of `{"key": [...]}`), or a one-line error naming the item."""
    found = _diagnose_encoding(path)
    if found:
        raise LorakitError(found)
    if _blank(path):
        raise LorakitError(f"{path}: no examples (the file is empty)")
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines in a .json file
            return _scan_jsonl(path)
        raise LorakitError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise LorakitError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise LorakitError(f"{path}: {' '.join(str(err).split())[:200]}") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))
    if not isinstance(obj, list):
        raise LorakitError(f"{path}: expected a JSON list of examples, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise LorakitError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
    return obj


def _diagnose_csv(path: Path, kind: str) -> str | None:
    start, width = 1, None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for start, row in _csv_rows(f, kind):
                if not row or all(not c.strip() for c in row):
                    continue
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    if any("\n" in cell for cell in row):  # the reader ran to the end of the file inside quotes
                        return f"{path}:{start}: a quote opened on this line is never closed"
                    return f"{path}:{start}: expected {width} columns, found {len(row)}"
    except csv.Error:
        return f"{path}:{start}: a quote opened on this line is never closed"
    return None


# --- columns and layouts ------------------------------------------------------------------------


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
            raise LorakitError(f"--columns: {role!r} is not one of lorakit's columns ({', '.join(ROLES)})")
        if not isinstance(column, str) or not column:
            raise LorakitError(f"--columns: the column for {role!r} must be a column name (or a position from 1, "
                               f"written as a string: '4'), got {column!r}")


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


def map_columns(records: list[Record], explicit: dict[str, str], task: str, spec: Any) -> tuple[list[Record], dict[str, Any]]:
    """Records whose `data` holds lorakit's roles, and a summary {"mapping", "ignored"}.
    A column named in `explicit` that the data lacks is an error listing the data's columns."""
    check_column_roles(explicit)
    present: dict[str, None] = {}
    for record in records:
        present.update(dict.fromkeys(k for k, v in record.data.items() if v is not None))
    missing = [c for c in explicit.values() if c not in present]
    if missing:
        raise LorakitError(f"{spec}: --columns names {missing}, which the data does not have; its columns: "
                           f"{', '.join(present)}")
    mapping = recognise_columns(set(present), task, explicit)
    mapped = [Record({role: record.data.get(column) for role, column in mapping.items() if record.data.get(column) is not None},
                     record.source, record.data) for record in records]
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
            raise LorakitError(
                f"{record.source}: no known layout in the columns {columns}; expected one of: "
                + "; ".join(f"{k} {v}" for k, v in FORMATS.items())
                + ". Map your columns with --columns ROLE=COLUMN (e.g. --columns prompt=question,completion=answer)"
                + ("; a file without a header row by position, from 1 (e.g. --columns text=2,label=1)"
                   if isinstance(record.source, Where) and record.source.origin.kind in ("csv", "tsv") else "")
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
        raise LorakitError(f"{where}: '{key}' holds an invalid character ({value[err.start]!r}, a lone surrogate: "
                           "an escape such as \\ud800 without its pair)") from None


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


# --- tokenization -------------------------------------------------------------------------------


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
    lead = next((full[:start] for start in range(len(full) - len(plain) + 1) if full[start:start + len(plain)] == plain), [])
    with contextlib.suppress(TypeError):
        _LEADING[tokenizer] = tuple(lead)
    return lead


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids a prompt (or a whole text) is trained on and generated from, in `lorakit train`, `eval`
    and `generate` alike: the tokenizer's leading special tokens (its BOS) once, then the text's own
    tokens. A text a chat template rendered with the BOS already in it (`{{ bos_token }}`) does not get
    a second one, and nothing the tokenizer would append (an EOS) closes it: a completion follows."""
    ids, lead = _ids(tokenizer, text, False), leading_special_ids(tokenizer)
    return ids if ids[:len(lead)] == lead else lead + ids


def prompt_completion_ids(tokenizer, prompt: str, completion: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
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
        raise LorakitError(f"prompt_template {template!r} uses no column: write e.g. 'Question: {{prompt}}\\nAnswer:', "
                           "or 'chat' for the tokenizer's chat template")
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
        raise LorakitError(f"{record.source}: the prompt template uses {{{err.args[0]}}}, but this record has no such "
                           f"column; it has: {', '.join(sorted(values))}") from None


def to_prompt_completion(record: dict[str, Any] | Record, fmt: str, tokenizer, template: str | None = None) -> tuple[str, str] | None:
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


def encode_causal(records: list[Record], fmt: str, tokenizer, max_length: int, train_on_prompt: bool,
                  template: str | None = None, skipped: list[str] | None = None) -> list[Example]:
    """Token ids and labels for a causal LM. An example with no loss token left within `max_length`
    is an error, or, with a `skipped` list, left out and its place appended there."""
    if fmt == "label":
        raise LorakitError(f"{data_name(records)}: text + label data is for sequence tasks: add --task classify (or --task regress)")
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
        raise LorakitError(f"{record.source}: the label spans several lines ({text[:40]!r}...): a quote opened in "
                           "this row is probably never closed")
    return text


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except (ValueError, OverflowError):
        return False


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
    if all(_is_number(label) for label in labels):
        raise LorakitError(f"{data_name(records)}: the labels are real numbers (e.g. "
                           f"{sorted(labels, key=Decimal)[len(labels) // 2][:40]}): for a numeric target use --task regress")
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
        raise LorakitError(f"{record.source}: the target {str(value)[:40]!r} is not a number (--task regress)") from None
    if not math.isfinite(target):
        raise LorakitError(f"{record.source}: the target {value!r} is not a finite number")
    return target


def encode_regress(records: list[Record], fmt: str, tokenizer, max_length: int) -> list[Example]:
    """Token ids and float targets (--task regress)."""
    if fmt != "label":
        raise LorakitError(f"{data_name(records)}: --task regress needs text + a numeric label or score column, got {fmt} {FORMATS[fmt]}")
    examples = []
    for record in records:
        ids, types = _sequence_ids(tokenizer, record, max_length)
        examples.append(Example(ids, label=regression_target(record), token_type_ids=types))
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
    """Right-padded batch: input_ids, attention_mask, token_type_ids (sentence pairs), and labels
    (token ids, class indices or float targets)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            token_type_ids[row, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        batch["token_type_ids"] = token_type_ids
    if examples[0].labels is not None:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    elif isinstance(examples[0].label, float):
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches the uninterrupted run would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def evenly_spaced(examples: list, fraction: float) -> list:
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
