"""Turning a reader's failure into one line that names the place: the file and line (JSON Lines,
CSV/TSV), item (JSON lists) or row of what is wrong.

`datasets` reads the files; where it fails (or would crash pyarrow), the readers here go through the
file line by line to say where: a bad byte, a line that is not JSON, a quote never closed, a row of
another width.
"""

from __future__ import annotations

import codecs
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from ...errors import LorakitError, short_repr
from .records import _csv_rows


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
                return (
                    f"{path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1}); lorakit "
                    f"reads UTF-8: convert the file, e.g. iconv -f latin1 -t UTF-8"
                )
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


def _diagnose_csv(path: Path, kind: str, headerless: bool = False) -> str | None:
    """The first row whose field count differs from the header's (the first row's, in a file without a
    header row; blank rows aside), or None."""
    start, width, header = 1, None, []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for start, row in _csv_rows(f, kind):
                if not row or all(not c.strip() for c in row):
                    continue
                if width is None:
                    width, header = len(row), [c.strip() for c in row]
                elif len(row) != width:
                    if any("\n" in cell for cell in row):  # the reader ran to the end of the file inside quotes
                        return f"{path}:{start}: a quote opened on this line is never closed"
                    if headerless:
                        return f"{path}:{start}: expected {width} columns, as in the first row, found {len(row)}"
                    return (
                        f"{path}:{start}: expected {width} columns, found {len(row)} (the header names "
                        f"{short_repr(header)})"
                    )
    except csv.Error:
        return f"{path}:{start}: a quote opened on this line is never closed"
    except UnicodeDecodeError:  # named by _diagnose_encoding
        return None
    return None
