"""Reading data files: a path, a glob or a comma-separated list, through Hugging Face `datasets`
(offline, quiet, its cache in a temporary directory), or a directory written by `save_to_disk`.

Every row comes back as a `Record` that knows its file and line; roles are assigned later
(`columns.map_columns`). Where `datasets` fails, `diagnosis` says where the file is wrong.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import LorakitError, short_repr
from .columns import map_columns
from .diagnosis import _blank, _diagnose, _diagnose_csv, _diagnose_encoding, _first_line, _scan_json, _scan_jsonl
from .records import SUFFIXES, Origin, Record, Where, _csv_rows, is_number


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


def read_table(
    spec: str | Path, split: str | None = None, split_flag: str = "--split", columns: dict[str, str] | None = None
) -> list[Record]:
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


def read_records(
    spec: str | Path, columns: dict[str, str] | None = None, task: str = "causal-lm", split: str | None = None
) -> list[Record]:
    """The records of `spec` with lorakit's roles assigned (`map_columns`)."""
    records, _ = map_columns(read_table(spec, split, columns=columns), columns or {}, task, spec)
    return records


def _read_source(
    path: Path, split: str | None, split_flag: str = "--split", positions: list[int] | None = None
) -> Iterator[tuple[Origin, list[dict[str, Any]]]]:
    kind = "saved" if path.is_dir() else SUFFIXES.get(path.suffix.lower())
    if positions and kind not in ("csv", "tsv"):
        raise LorakitError(
            f"{path}: --columns by position is for CSV/TSV files without a header row; name this file's columns by name"
        )
    if path.is_dir():
        yield _read_saved(path, split, split_flag)
        return
    if kind is None:
        raise LorakitError(
            f"{path}: unknown data file type {path.suffix!r} (use {', '.join(SUFFIXES)}, or a directory "
            "written by datasets' save_to_disk)"
        )
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
    if head.startswith(
        (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
    ) and not head.startswith(codecs.BOM_UTF8):
        raise LorakitError(
            f"{path}: the file is UTF-16/32 encoded; lorakit reads UTF-8 (convert it, e.g. "
            f"iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix})"
        )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """`datasets`, offline, without its progress bars and log lines (lorakit words its own errors)."""
    from ...models import _offline

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


def _load_file(
    path: Path, kind: str, field_name: str | None = None, names: list[str] | None = None
) -> list[dict[str, Any]]:
    """The rows of one file through `datasets.load_dataset` (its cache in a temporary directory:
    the rows are kept in memory, and a user's cache should not fill with copies of every file).
    `names`: the column names of a CSV/TSV file without a header row."""
    if kind in ("csv", "tsv"):
        # a row of another width than the header is misread, not refused, by pandas (one more field in
        # every row turns the first column into an index): refused here, at its line
        found = _diagnose_csv(path, kind, headerless=names is not None)
        if found:
            raise LorakitError(found)
    builder, options = _builder(path, kind, names)
    if field_name is not None:
        options["field"] = field_name
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="lorakit-data-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **options)
            rows = table.to_list()
            if kind in ("csv", "tsv"):  # rows of empty cells (`\t`, `,`, often trailing) are blank lines too
                rows = [row for row in rows if any(isinstance(v, str) and v.strip() for v in row.values())]
            return rows
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
            "features": Features({name: Value("string") for name in names}),
            "keep_default_na": False,
            "na_filter": False,
            "encoding": "utf-8-sig",
            # the names as lorakit reads them (` label ` is `label`): with a header row, header=0 replaces the file's own
            "column_names": names,
            "header": None if headerless else 0,
        }
        if kind == "tsv":
            options.update(sep="\t", quoting=csv.QUOTE_NONE)
        return "csv", options
    return kind, {}


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
        raise LorakitError(
            f"--columns: name every column by position (text=4,label=2, for a file without a header row) "
            f"or every one by name, not both: {columns}"
        )
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
            raise LorakitError(
                f"{path}: --columns names column {max(positions)}, but the file has {len(first)} columns"
            )
        return [str(i) for i in range(1, len(first) + 1)]
    if (
        kind == "tsv"
        and len(first) == 4
        and first[1] in ("0", "1")
        and first[3]
        and first[0]
        and not any(c.isspace() for c in first[0])
        and not any(c.isalnum() for c in first[2])
    ):
        return list(COLA_COLUMNS)
    if any(is_number(cell) for cell in first):
        cells = ", ".join(f"{i}={cell[:30]!r}" for i, cell in enumerate(first, start=1))
        raise LorakitError(
            f"{path}:1: the file has no header row (its first row is data: {cells}); name its columns by "
            "position, counted from 1, e.g. --columns text=N,label=M"
        )
    return None


def _read_saved(path: Path, split: str | None, split_flag: str = "--split") -> tuple[Origin, list[dict[str, Any]]]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if (path / "dataset_dict.json").is_file():
        splits = _declared_splits(path)
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
        raise LorakitError(
            f"{path} is a directory but not a dataset written by save_to_disk; give its data files "
            f"(a glob works: {path}/*.parquet)"
        )
    with _quiet_datasets() as datasets:
        try:
            rows = datasets.load_from_disk(str(target)).to_list()
        except Exception as err:  # noqa: BLE001 -- as in _load_file
            raise LorakitError(f"{target}: cannot read the saved dataset: {_first_line(err)}") from None
    return Origin(path, "saved", split), rows


def _declared_splits(path: Path) -> list[str]:
    """The `splits` of a DatasetDict directory's dataset_dict.json: a list of names of its subdirectories."""
    where = path / "dataset_dict.json"
    try:
        declared = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read {where}: {getattr(err, 'strerror', None) or err}") from None
    except RecursionError:
        raise LorakitError(f"{where}: nested too deeply to be a split list") from None
    except ValueError:
        raise LorakitError(f"{where} is not valid JSON") from None
    splits = declared.get("splits") if isinstance(declared, dict) else None
    if (
        not isinstance(splits, list)
        or not splits
        or not all(
            isinstance(s, str) and s.strip() and s not in (".", "..") and "/" not in s and "\\" not in s for s in splits
        )
    ):
        raise LorakitError(
            f'{where}: "splits" must be a list of split names (the subdirectories, e.g. ["train", '
            f'"validation"]), got {short_repr(splits)}'
        )
    return splits


def saved_splits(spec: str | Path) -> list[str]:
    """The splits of a saved DatasetDict directory (empty for anything else)."""
    path = Path(spec)
    if not (path / "dataset_dict.json").is_file():
        return []
    return _declared_splits(path)
