"""Seeded fuzzing of what users hand lorakit: data files, configs, adapter directories.

The contract: malformed input gets a one-line error (or, where the input is still usable, a correct
result), never a traceback. Three families, each case built from `random.Random(case_id)` so a
failure is reproducible from its id alone:

1. data files (.jsonl/.json/.csv/.tsv/.parquet) through `lorakit.train.data`: a result, or a
   `LorakitError` of one line that names the file;
2. configs (`config.from_dict` + `loop.check_config`, and YAML files through `config.load_yaml`):
   a checked config, or a one-line `LorakitError`;
3. adapter directories through `lorakit.io.load` onto a tiny model: a working adapter, or one of
   the errors `load` documents (ValueError, FileNotFoundError, KeyError) in one line, with
   nothing half-loaded left on the model; and a sample through `lorakit eval` (in-process): exit
   status 0, or 2 with a single `error: ...` line on stderr.

Every chunk runs all its cases and reports every failing one. To rebuild a case by hand (e.g. in
a REPL started in tests/):

    from test_fuzz import build_data_case, build_config_case, build_adapter_case
    case = build_data_case("data:3:17", Path("/tmp/x"))       # writes the file, returns its settings
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import datetime
import gc
import io as _io
import json
import math
import os
import pickle
import random
import select
import shutil
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.train import config as config_mod
from lorakit.train import data

CHUNKS = 10
DATA_CASES = 30  # per chunk
CONFIG_CASES = 30  # per chunk: 15 dicts + 15 YAML files
ADAPTER_CASES = 30  # per chunk
CLI_CHUNKS, CLI_CASES = 2, 10
MAX_FILE_BYTES = 50_000


# --- shared machinery ---------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs too long (BaseException: `except Exception` in the code
    under test must not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Abort the block after `seconds` (SIGALRM; a no-op where signals are unavailable)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_isolated(fn: Callable[[], Any], seconds: float) -> tuple:
    """Run `fn` in a forked child, so that a crash (a segfault in a C reader) or a hang fails one
    case instead of the whole session. Returns ("ok", value), ("raised", type name, message,
    where, is LorakitError), ("crashed", description) or ("timeout", seconds). Without fork (or
    off the main thread) `fn` runs here, under `time_limit`."""
    if not hasattr(os, "fork") or threading.current_thread() is not threading.main_thread():
        try:
            with time_limit(seconds):
                return ("ok", fn())
        except KeyboardInterrupt:
            raise
        except CaseTimeout:
            return ("timeout", seconds)
        except BaseException as err:  # noqa: BLE001
            return ("raised", type(err).__name__, str(err), where_raised(err), isinstance(err, LorakitError))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send the outcome, leave without running the parent's cleanup
        gc.disable()  # short-lived: a collection would touch (and so copy) every page of the parent's heap
        # the parent's OpenMP thread pool does not survive fork: a parallel region in the child (any large
        # enough torch op, once the parent has used the pool) would wait forever for its threads
        torch.set_num_threads(1)
        status = 0
        try:
            os.close(read_end)
            try:
                outcome: tuple = ("ok", fn())
            except BaseException as err:  # noqa: BLE001
                outcome = ("raised", type(err).__name__, str(err), where_raised(err), isinstance(err, LorakitError))
            try:
                payload = pickle.dumps(outcome)
            except Exception as err:  # noqa: BLE001
                payload = pickle.dumps(("raised", "PicklingError", str(err), "the fuzz harness", False))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks, deadline, timed_out = [], time.monotonic() + seconds, False
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(pipe.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return ("timeout", seconds)
    if os.WIFSIGNALED(status):
        return ("crashed", f"the process died of {signal.Signals(os.WTERMSIG(status)).name}")
    if not chunks:
        return ("crashed", f"the process exited with status {os.WEXITSTATUS(status)} and no outcome")
    return pickle.loads(b"".join(chunks))


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message and "\r" not in message


def where_raised(err: BaseException) -> str:
    """The innermost frame (and the innermost lorakit frame) of an exception, for the report."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    own = [f for f in frames if "/lorakit/" in f.filename.replace("\\", "/")]
    text = f"{Path(last.filename).name}:{last.lineno} in {last.name}"
    if own and own[-1] is not last:
        text += f" (via {Path(own[-1].filename).name}:{own[-1].lineno} in {own[-1].name})"
    return text


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {' | '.join(str(err).splitlines())[:300]!r} at {where_raised(err)}"


def report(failures: list[str], family: str, total: int) -> None:
    assert not failures, f"{len(failures)} of {total} {family} cases failed:\n" + "\n".join(failures)


class Raw:
    """Text written verbatim into a JSON (or CSV) file: values Python's json cannot produce, or
    would need deep recursion to (deep nesting, 1e400, -0, duplicate keys)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def dump_json(value: Any, ensure_ascii: bool = True) -> str:
    """json.dumps that writes `Raw` verbatim (NaN/Infinity and huge ints as Python writes them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(
                f"{json.dumps(k if isinstance(k, str) else str(k), ensure_ascii=ensure_ascii)}: "
                f"{dump_json(v, ensure_ascii)}"
                for k, v in value.items()
            )
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dump_json(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def deep(depth: int, opener: str = "[", closer: str = "]", inner: str = "") -> Raw:
    return Raw(opener * depth + inner + closer * depth)


def encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates become invalid UTF-8 bytes


BYTE_POOL = [
    b"\xff",
    b"\xfe",
    b"\xc3",
    b"\x80",
    b"\xed\xa0\x80",
    b"\x00",
    b'"',
    b"'",
    b",",
    b"\t",
    b"\n",
    b"\r",
    b"\r\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"\\",
    b"\\u",
    b"\\ud800",
    codecs.BOM_UTF8,
    b" ",
    b"#",
    b"-",
    b"!!",
    b"&",
    b"*",
    b"|",
    b">",
    b"%",
    b"?",
]


BYTE_DAMAGE = [
    "flip",
    "insert",
    "delete",
    "truncate",
    "bom",
    "utf16",
    "utf16le",
    "utf32",
    "latin1",
    "empty",
    "blank",
    "nul",
    "crlf",
    "cr",
    "garbage-line",
    "duplicate",
]


def mutate_bytes(rng: random.Random, raw: bytes, kind: str | None = None) -> tuple[bytes, str]:
    """One byte-level damage (`kind`, default: a random one): flips, insertions, deletions,
    truncation, other encodings."""
    kind = kind or rng.choice(BYTE_DAMAGE + ["flip", "insert"])
    n = len(raw)
    if kind in ("flip", "delete") and not n:
        return raw, kind
    if kind == "flip" and n:
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(n)] = rng.randrange(256)
        return bytes(buf), kind
    if kind == "insert":
        at = rng.randint(0, n)
        return raw[:at] + rng.choice(BYTE_POOL) * rng.choice([1, 1, 2, 50]) + raw[at:], kind
    if kind == "delete" and n:
        at = rng.randrange(n)
        return raw[:at] + raw[at + rng.randint(1, 20) :], kind
    if kind == "truncate":
        return raw[: rng.randint(0, n)], kind
    if kind == "bom":
        return codecs.BOM_UTF8 + raw, kind
    try:
        text = raw.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError:  # damaged already: re-encode what is readable
        text = raw.decode("utf-8", errors="replace")
    if kind == "utf16":
        return text.encode("utf-16", errors="surrogatepass"), kind
    if kind == "utf16le":  # no byte-order mark
        return text.encode("utf-16-le", errors="surrogatepass"), kind
    if kind == "utf32":
        return text.encode("utf-32", errors="surrogatepass"), kind
    if kind == "latin1":
        return text.replace("e", "é").encode("latin-1", errors="replace"), kind
    if kind == "empty":
        return b"", kind
    if kind == "blank":
        return rng.choice([b" ", b"\n\n", b"  \t\n \r\n", codecs.BOM_UTF8 + b"\n"]), kind
    if kind == "nul":
        return raw.replace(b"\n", b"\n\x00", 1), kind
    if kind == "crlf":
        return raw.replace(b"\n", b"\r\n"), kind
    if kind == "cr":
        return raw.replace(b"\n", b"\r"), kind
    if kind == "garbage-line":
        return raw + rng.choice([b"\ngarbage", b"\n}", b"\n,,,\n", b'\n"unterminated', b"\n[1,2]\n", b"\nnull\n"]), kind
    lines = raw.split(b"\n")
    return b"\n".join(lines[:1] + lines), "duplicate"


# --- family 1: data files -----------------------------------------------------------------------

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "green",
    "lamp",
    "piano",
    "honey",
    "héllo",
    "日本",
    "🙂",
    "good",
    "bad",
    "a,b",
    'say "hi"',
    "tab\there",
    "x'y",
    "{prompt}",
    "#1",
    "null",
    "NA",
    "007",
    "",
]


def text(rng: random.Random, lo: int = 1, hi: int = 6) -> str:
    return " ".join(rng.choice(WORDS[:-1]) for _ in range(rng.randint(lo, hi)))


def base_records(rng: random.Random, layout: str) -> list[dict[str, Any]]:
    records = []
    classes = rng.choice([["pos", "neg"], [0, 1], ["0", "1", "2"], [True, False], ["entailment", "neutral"]])
    for _ in range(rng.randint(1, 6)):
        if layout == "alpaca":
            records.append({"instruction": text(rng), "input": rng.choice(["", text(rng)]), "output": text(rng)})
        elif layout == "chat":
            turns = [{"role": "system", "content": text(rng)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 2)):
                turns += [{"role": "user", "content": text(rng)}, {"role": "assistant", "content": text(rng)}]
            records.append({"messages": turns})
        elif layout == "prompt-completion":
            records.append({"prompt": text(rng), "completion": text(rng)})
        elif layout == "qa":
            records.append({"question": text(rng), "answer": text(rng) + " #### " + str(rng.randint(0, 99))})
        elif layout == "text":
            records.append({"text": text(rng)})
        elif layout == "label":
            records.append({"text": text(rng), "label": rng.choice(classes)})
        elif layout == "pair":
            records.append({"sentence1": text(rng), "sentence2": text(rng), "label": rng.choice(classes)})
        else:  # regress
            records.append({"sentence1": text(rng), "sentence2": text(rng), "score": round(rng.uniform(0, 5), 2)})
    return records


TASK_OF = {
    "alpaca": "causal-lm",
    "chat": "causal-lm",
    "prompt-completion": "causal-lm",
    "qa": "causal-lm",
    "text": "causal-lm",
    "label": "classify",
    "pair": "classify",
    "regress": "regress",
}

FIELD_NAMES = [
    "text",
    "label",
    "messages",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "text_pair",
    "sentence",
    "sentence1",
    "sentence2",
    "score",
    "question",
    "answer",
    "extra",
    "",
    " ",
    "Text",
    "label ",
    "#1 String",
    "\ufefftext",
    "a\u0000b",
    "idx",
]

ODD_LABELS = [
    "",
    " ",
    "\t",
    "pos\n",
    "a\nb",
    "1.5",
    "-0",
    "0.0",
    "1e999",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1_000",
    "٣",
    "²",
    "0x10",
    "+1",
    " 1",
    "1 ",
    "00",
    "9" * 5000,
    "-" * 3,
    "True",
    "None",
    "null",
    "\ud800",
    "🙂",
    "x" * 3000,
    0,
    1,
    -1,
    2**63,
    10**400,
    1.0,
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    [],
    [1],
    {},
    {"a": 1},
    Raw("1e400"),
    Raw("-1e400"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("9" * 5000),
    Raw("-0"),
    Raw("1.0e+2"),
    Raw("0.1e-400"),
]


def weird_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            1,
            -1,
            10**400,
            2**63,
            -(2**63) - 1,
            1.5,
            float("nan"),
            float("inf"),
            -0.0,
            1e308,
            "",
            " ",
            "\t",
            "\n",
            "a\nb",
            "\ud800",
            "x\udfffy",
            "\x00",
            "\u2028",
            "🙂" * 3,
            "é",
            "0",
            "1.5",
            "nan",
            "1e999",
            "None",
            "٣",
            "9" * 5000,
            [],
            [1, 2],
            ["a"],
            [None],
            {},
            {"a": 1},
            {"role": "user", "content": "x"},
            [{"role": "user"}],
            deep(rng.choice([3, 300, 3000])),
            deep(rng.choice([3, 300]), '{"a": ', "}", "1"),
            Raw("1e400"),
            Raw("-0"),
            Raw("NaN"),
            Raw("-Infinity"),
            Raw("9" * 5000),
            "x" * rng.randint(1000, 20_000),
        ]
    )


def bad_messages(rng: random.Random, messages: Any) -> Any:
    kind = rng.choice(
        [
            "role",
            "role",
            "no-user",
            "assistant-first",
            "content",
            "not-dict",
            "empty",
            "string",
            "no-assistant",
            "missing-key",
            "extra-key",
            "null",
        ]
    )
    messages = [dict(m) if isinstance(m, dict) else m for m in (messages if isinstance(messages, list) else [])]
    if not messages:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    i = rng.randrange(len(messages))
    if kind == "role":
        messages[i]["role"] = rng.choice(
            ["", "User", "bot", "tool", "function", "ipython", 1, None, ["user"], "\ud800", "assistant ", "system"]
        )
    elif kind == "no-user":
        messages = [m for m in messages if m.get("role") not in ("user", "system")]
    elif kind == "assistant-first":
        messages.insert(0, {"role": "assistant", "content": "first"})
    elif kind == "content":
        messages[i]["content"] = weird_value(rng)
    elif kind == "not-dict":
        messages[i] = rng.choice(["user: hi", 3, None, ["user", "hi"]])
    elif kind == "empty":
        messages = []
    elif kind == "string":
        return rng.choice(["user: hi\nassistant: yo", "[]", ""])
    elif kind == "no-assistant":
        messages = [m for m in messages if m.get("role") != "assistant"]
    elif kind == "missing-key":
        messages[i].pop(rng.choice(["role", "content"]))
    elif kind == "extra-key":
        messages[i][rng.choice(["name", "tool_calls", "weight"])] = weird_value(rng)
    else:
        return None
    return messages


RECORD_DAMAGE = [
    "wrong-type",
    "drop-field",
    "extra-field",
    "rename-field",
    "odd-label",
    "chat",
    "non-object",
    "no-records",
    "long-field",
    "surrogate",
    "deep",
    "all-null",
    "duplicate-key",
]


def mutate_records(rng: random.Random, records: list[Any], kind: str | None = None) -> tuple[list[Any], str]:
    """One damage to the records (`kind`, default: a random one): wrong types, odd labels, bad chats, ..."""
    kind = kind or rng.choice(RECORD_DAMAGE + ["wrong-type", "odd-label"])
    if kind == "no-records":
        return [], kind
    i = 0 if kind == "non-object" and rng.random() < 0.5 else rng.randrange(len(records))  # a first line counts twice
    record = records[i]
    if not isinstance(record, dict):
        return records, "none"
    keys = list(record)
    if kind == "wrong-type":
        record[rng.choice(keys + FIELD_NAMES)] = weird_value(rng)
    elif kind == "drop-field" and keys:
        record.pop(rng.choice(keys))
    elif kind == "extra-field":
        record[rng.choice(FIELD_NAMES)] = rng.choice([text(rng), weird_value(rng)])
    elif kind == "rename-field" and keys:
        old = rng.choice(keys)
        record[rng.choice(FIELD_NAMES)] = record.pop(old)
    elif kind == "odd-label":
        record[rng.choice(["label", "label", "score", "gold_label"])] = rng.choice(ODD_LABELS)
    elif kind == "chat":
        record["messages"] = bad_messages(rng, record.get("messages"))
    elif kind == "non-object":
        records[i] = rng.choice([None, None, None, [1, 2], 3, "text", True, [], deep(50), Raw("NaN")])
    elif kind == "long-field" and keys:
        record[rng.choice(keys)] = "long " * rng.randint(500, 4000)
    elif kind == "surrogate" and keys:
        record[rng.choice(keys)] = rng.choice(["\ud800", "a\udc00b", "\udbff\udfff", "x\ud800"])
    elif kind == "deep" and keys:
        record[rng.choice(keys)] = deep(rng.choice([10, 255, 257, 600, 1500, 5000]))
    elif kind == "all-null":
        records[i] = {k: None for k in keys}
    elif kind == "duplicate-key" and keys:
        key = rng.choice(keys)
        records[i] = Raw(
            "{"
            + ", ".join(
                [f"{json.dumps(k)}: {dump_json(v)}" for k, v in record.items()]
                + [f"{json.dumps(key)}: {dump_json(weird_value(rng))}"]
            )
            + "}"
        )
    return records, kind


def cell(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return dump_json(value)


def serialize(rng: random.Random, records: list[Any], kind: str, damage: bool = True) -> bytes:
    """The records as a file of `kind`; with `damage`, sometimes in a shape that is not valid (two
    top-level keys, ragged rows, an unterminated quote)."""
    if kind == "jsonl":
        ascii_ = rng.random() < 0.7
        lines = [dump_json(r, ascii_) for r in records]
        if lines and rng.random() < 0.2:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["", "  ", "\t"]))
        return encode("\n".join(lines) + rng.choice(["\n", "", "\n\n"]))
    if kind == "json":
        shape = rng.choice(
            ["list", "list", "wrapped", "two-keys", "object", "pretty"] if damage else ["list", "pretty"]
        )
        if shape == "wrapped":
            body: Any = {rng.choice(["data", "train", "examples", ""]): records}
        elif shape == "two-keys":
            body = {"version": 1, "data": records}
        elif shape == "object":
            body = records[0] if records else {}
        else:
            body = records
        textual = dump_json(body, rng.random() < 0.7)
        if shape == "pretty":
            textual = textual.replace(", ", ",\n  ")
        return encode(textual)
    # csv / tsv: a header from the union of the keys, one row per record (non-objects as one cell)
    header: list[str] = []
    for r in records:
        for k in r if isinstance(r, dict) else ["value"]:
            if k not in header:
                header.append(k)
    rows = [[cell(r.get(h)) if isinstance(r, dict) else cell(r) for h in header] for r in records]
    if damage and rows and rng.random() < 0.15:  # ragged rows
        row = rng.choice(rows)
        if rng.random() < 0.5 and row:
            row.pop()
        else:
            row.append("extra")
    if kind == "tsv":
        return encode("\n".join("\t".join(row) for row in [header] + rows) + "\n")
    out = _io.StringIO()
    writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(header)
    writer.writerows(rows)
    textual = out.getvalue()
    if damage and rng.random() < 0.15:  # an unterminated quote
        at = rng.randint(0, len(textual))
        textual = textual[:at] + '"' + textual[at:]
    return encode(textual)


def parquet_safe(value: Any) -> Any:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return str(value)
    return value


def write_parquet(rng: random.Random, records: list[Any], path: Path) -> str:
    import datasets

    rows = [r if isinstance(r, dict) else {"value": r} for r in records]
    attempts = [
        lambda: [{k: parquet_safe(v) for k, v in r.items()} for r in rows],
        lambda: [{k: None if v is None else cell(v) for k, v in r.items()} for r in rows],  # everything as text
        lambda: [{"text": "fallback"}],
    ]
    for attempt in attempts:
        try:
            datasets.Dataset.from_list(attempt()).to_parquet(str(path))
            return ""
        except Exception:  # noqa: BLE001 -- arrow refuses mixed types: the next, simpler, version
            continue
    raise AssertionError("could not write even the fallback parquet file")


@dataclasses.dataclass
class DataCase:
    case_id: str
    path: Path
    task: str
    columns: dict[str, str] | None
    max_length: int
    steps: list[str]


FILE_KINDS = ["jsonl", "json", "csv", "jsonl", "tsv", "json", "parquet", "csv"]


def case_number(case_id: str, per_chunk: int) -> int:
    """`family:chunk:i` -> its place among all the family's cases."""
    _, chunk, i = case_id.split(":")
    return int(chunk) * per_chunk + int(i)


def forced(n: int, options: list, slot: int, slots: int = 5, used: tuple[int, ...] = (1, 2)) -> Any:
    """Stratification: among each `slots` consecutive cases, those whose position is in `used`
    take `options` in turn (so every option is tried, whatever the seeds), the others None."""
    if n % slots not in used:
        return None
    return options[((n // slots) * len(used) + used.index(n % slots) + slot) % len(options)]


def build_data_case(case_id: str, directory: Path) -> DataCase:
    """Write the file of case `case_id` under `directory`; return how to read it."""
    rng = random.Random(case_id)
    n = case_number(case_id, DATA_CASES)
    layout = list(TASK_OF)[n % len(TASK_OF)]  # every layout in every file type
    kind = FILE_KINDS[(n // len(TASK_OF)) % len(FILE_KINDS)]
    task = TASK_OF[layout] if rng.random() < 0.85 else rng.choice(["causal-lm", "classify", "regress"])
    records: list[Any] = base_records(rng, layout)
    steps = [f"layout={layout}", f"kind={kind}", f"task={task}"]
    record_damage = forced(n, RECORD_DAMAGE, 0, used=(1, 2))  # 2 cases in 5 damage the records first,
    byte_damage = forced(n, BYTE_DAMAGE, 0, used=(3, 4))  # 2 the bytes; all then take random damage
    if record_damage:
        records, what = mutate_records(rng, records, record_damage)
        steps.append(what)
    damaged = record_damage or byte_damage  # then less random damage: the forced one should reach far
    for _ in range(rng.choice([0, 0, 0, 1] if damaged else [0, 0, 1, 1, 2, 3])):
        if not records:
            break
        records, what = mutate_records(rng, records)
        steps.append(what)
    stem = rng.choice(["case", "case", "my data", "dätä", "x.y"])
    suffix = "." + kind if rng.random() < 0.9 else "." + kind.upper()
    path = directory / f"{stem}{suffix}"
    if kind == "parquet":
        write_parquet(rng, records, path)
        if byte_damage or rng.random() < 0.25:
            raw, what = mutate_bytes(rng, path.read_bytes(), byte_damage)
            path.write_bytes(raw)
            steps.append(what)
    else:
        raw = serialize(rng, records, kind)
        if byte_damage:
            raw, what = mutate_bytes(rng, raw, byte_damage)
            steps.append(what)
        for _ in range(rng.choice([0, 0, 0, 0, 1] if damaged else [0, 0, 0, 1, 1, 2])):
            raw, what = mutate_bytes(rng, raw)
            steps.append(what)
        path.write_bytes(raw[:MAX_FILE_BYTES])
    columns = None
    if rng.random() < 0.1:
        # valid roles only: a bad role is a flag error (the config family fuzzes those), not the file's
        columns = rng.choice(
            [
                {"text": "sentence1"},
                {"label": "nope"},
                {"prompt": "instruction"},
                {"text": "extra"},
                {"messages": "text"},
                {"label": "text", "text": "label"},
                {"completion": "label"},
            ]
        )
        steps.append(f"columns={columns}")
    max_length = rng.choice([64, 64, 64, 512, 16, 2, 1])
    return DataCase(case_id, path, task, columns, max_length, steps)


def run_data_case(case: DataCase, tokenizer) -> tuple[list, list, list[str] | None]:
    records = data.read_records(case.path, columns=case.columns, task=case.task)
    fmt = data.check_records(records, case.path)
    labels = None
    if case.task == "classify":
        labels = data.label_names(records)
        examples = data.encode_classify(records, fmt, tokenizer, case.max_length, labels)
    elif case.task == "regress":
        examples = data.encode_regress(records, fmt, tokenizer, case.max_length)
    else:
        examples = data.encode_causal(records, fmt, tokenizer, case.max_length, train_on_prompt=False)
    return records, examples, labels


def data_result_problem(case: DataCase, records: list, examples: list, labels: list[str] | None) -> str | None:
    """What is wrong with a result that came back (None: it is a correct one)."""
    if not records or len(examples) != len(records):
        return f"{len(records)} records but {len(examples)} examples"
    for e in examples:
        if not e.input_ids or not all(isinstance(t, int) for t in e.input_ids) or len(e.input_ids) > case.max_length:
            return f"bad input_ids {e.input_ids[:8]}..."
        if case.task == "classify" and not (isinstance(e.label, int) and 0 <= e.label < len(labels)):
            return f"class index {e.label!r} outside {labels}"
        if case.task == "regress" and not (isinstance(e.label, float) and math.isfinite(e.label)):
            return f"regression target {e.label!r}"
        if case.task == "causal-lm" and (e.labels is None or len(e.labels) != len(e.input_ids)):
            return "labels do not match input_ids"
    return None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tiny_lm import save_tokenizer

    directory = tmp_path_factory.mktemp("fuzz-tokenizer")
    save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def valid_data_files(directory: Path) -> list[DataCase]:
    """A valid file of every layout in every file type, with one record and with several: the
    starting points the fuzz cases damage."""
    rng = random.Random("valid")
    cases = []
    for layout, task in TASK_OF.items():
        for kind in ("jsonl", "json", "csv", "tsv", "parquet"):
            if layout == "chat" and kind in ("csv", "tsv"):
                continue  # a cell holds text, not a list of messages
            for count in (1, 3):
                path = directory / f"{layout}-{count}.{kind}"
                records = (base_records(rng, layout) * 3)[:count]
                if kind == "tsv":  # TSV cells are taken as written: a tab in one is another cell
                    records = [
                        {k: v.replace("\t", " ") if isinstance(v, str) else v for k, v in r.items()} for r in records
                    ]
                if kind == "parquet":
                    write_parquet(rng, records, path)
                else:
                    path.write_bytes(serialize(rng, records, kind, damage=False))
                cases.append(DataCase(f"valid:{layout}:{kind}:{count}", path, task, None, 512, []))
    return cases


@pytest.fixture(scope="module")
def data_reader(tmp_path_factory, tokenizer):
    """The tokenizer, once a valid file has been read here: the forked cases then find `datasets`
    and pyarrow imported (each child would import them anew)."""
    for case in valid_data_files(tmp_path_factory.mktemp("fuzz-warm-up"))[:12]:
        with contextlib.suppress(Exception):  # the valid-file test reports what fails here
            run_data_case(case, tokenizer)
    return tokenizer


def test_valid_files_of_every_layout_and_type_are_read(tmp_path, data_reader):
    """The baseline: before damage, every layout in every file type gives a correct result."""
    failures = []
    cases = valid_data_files(tmp_path)
    for case in cases:
        try:
            problem = data_result_problem(case, *run_data_case(case, data_reader))
        except Exception as err:  # noqa: BLE001
            problem = describe(err)
        if problem:
            failures.append(f"[{case.case_id}] {case.path.name}: {problem}")
    report(failures, "valid-file", len(cases))


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_malformed_data_files_give_a_result_or_one_line_naming_the_file(chunk, tmp_path, data_reader):
    tokenizer = data_reader
    failures = []
    for i in range(DATA_CASES):
        case_id = f"data:{chunk}:{i}"
        directory = tmp_path / str(i)
        directory.mkdir()
        case = build_data_case(case_id, directory)
        label = f"[{case_id}] {case.path.name} ({', '.join(case.steps)})"
        outcome = run_isolated(lambda: data_result_problem(case, *run_data_case(case, tokenizer)), 30)
        if outcome[0] == "raised":
            _, kind, message, where, is_lorakit_error = outcome
            if not is_lorakit_error:
                failures.append(f"{label}: {kind}: {' | '.join(message.splitlines())[:300]!r} at {where}")
            elif not one_line(message):
                failures.append(f"{label}: LorakitError message is not one line: {message[:300]!r}")
            elif case.path.name not in message:
                failures.append(f"{label}: LorakitError does not name the file: {message[:300]!r}")
        elif outcome[0] in ("crashed", "timeout"):
            failures.append(f"{label}: {outcome[0]}: {outcome[1]}")
        elif outcome[1] is not None:
            failures.append(f"{label}: returned a wrong result: {outcome[1]}")
    report(failures, "data-file", DATA_CASES)


# --- family 2: configs --------------------------------------------------------------------------


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def weird_config_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2**31,
            -(2**31) - 1,
            2**63,
            10**400,
            float("nan"),
            float("inf"),
            -float("inf"),
            -0.0,
            1e308,
            5e-324,
            0.5,
            "",
            " ",
            "x",
            "none",
            "null",
            "True",
            "yes",
            "1e999",
            "-1",
            "٣",
            "²",
            "\x00",
            "a\nb",
            "x" * 5000,
            "9" * 5000,
            [],
            [1, "a"],
            [None],
            ["lm_head"],
            {},
            {"a": {"b": [1]}},
            {1: 2},
            nested_list(rng.choice([5, 3000])),
            b"\xff\x00",
            datetime.date(2001, 12, 14),
            (1, 2),
            {1, 2},
            1 + 2j,
        ]
    )


def plausible_value(rng: random.Random, name: str, kind: type) -> Any:
    """A value near what the field takes: the edges a user (or a typo) produces."""
    from lorakit.methods import METHODS

    if name == "method":
        return rng.choice(list(METHODS) + ["qlora", "LoRA", "lora ", "", "nope"])
    if name == "method_args":
        cls = rng.choice(list(METHODS.values()))
        fields = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
        return {
            rng.choice(fields): rng.choice(
                [
                    weird_config_value(rng),
                    plausible_value(rng, "r", int),
                    {"[": 4},
                    {"q_proj": "x"},
                    {"(": 1.0},
                    "(",
                    [1],
                    ["q_proj"],
                    "int8",
                ]
            )
            for _ in range(rng.randint(1, 3))
        }
    if name in config_mod.CHOICES:
        choices = list(config_mod.CHOICES[name])
        return rng.choice(choices + [choices[0].upper(), " " + choices[0], "", "x"])
    if kind is int:
        return rng.choice(
            [
                0,
                -1,
                1,
                8,
                2**31 - 1,
                2**31,
                -(2**31),
                10**400,
                "8",
                "08",
                " 8",
                "+8",
                "-0",
                "1e3",
                "٣",
                "²",
                8.0,
                8.5,
                True,
                "9" * 5000,
            ]
        )
    if kind is float:
        return rng.choice(
            [
                0.0,
                -0.0,
                1e-320,
                1e308,
                "1e308",
                "1e309",
                "nan",
                "inf",
                "-inf",
                float("nan"),
                10**400,
                "0x10",
                "1_0",
                0.5,
                1,
                True,
                "  2.5  ",
                "1e-400",
                2**1024 - 1,
                "9" * 400,
            ]
        )
    if kind is bool:
        return rng.choice([True, False, "yes", "no", "maybe", "TRUE", 1, 0, 2, "1", "", None, [], {}])
    if kind is list:
        return rng.choice(
            [
                [],
                ["lm_head"],
                "a,b",
                ",",
                [1, 2],
                [None],
                [["a"]],
                {"a": 1},
                5,
                "x",
                (1, 2),
                1.5,
                True,
                b"ab",
                nested_list(3000),
            ]
        )
    if kind is dict:
        return rng.choice(
            [
                {},
                {"prompt": "q"},
                {"bogus": "x"},
                {"prompt": 1},
                {"prompt": ""},
                {1: "x"},
                {"prompt": None},
                "prompt=q",
                "prompt",
                "a=b=c",
                ",",
                "=x",
                [],
                5,
                {"prompt": ["q"]},
                {"prompt": nested_list(3000)},
            ]
        )
    return rng.choice(
        [
            "",
            ".",
            "..",
            "a/b",
            "a\x00b",
            "x" * 5000,
            "{prompt}",
            "{",
            "}",
            "{0}",
            "{a.b}",
            "{a[0]}",
            "{a!r}",
            "{:>{}}",
            "{prompt:{x}}",
            "chat",
            "gsm8k",
            "last-number",
            "(",
            "(a)(b)",
            "[",
            "all-linear",
            "q_proj,v_proj",
            "q_proj,,",
            ",",
            ".*",
            "(?P<x",
            "a{1,}",
            "\\",
            5,
            True,
            ["a"],
        ]
    )


def random_config_dict(rng: random.Random, first: str | None = None) -> dict[Any, Any]:
    """1-4 fields (the first `first`, when given) set to edge or wrong values."""
    fields = dataclasses.fields(config_mod.TrainConfig)
    kinds = config_mod.field_types()
    out: dict[Any, Any] = {}
    for number in range(rng.randint(1, 4)):
        f = next(f for f in fields if f.name == first) if first and number == 0 else rng.choice(fields)
        key: Any = f.name
        if rng.random() < 0.1:
            key = f.name.replace("_", "-")
        if first and number == 0 and rng.random() < 0.2:
            value = None  # null in YAML: only optional fields take it
        else:
            value = plausible_value(rng, f.name, kinds[f.name]) if rng.random() < 0.6 else weird_config_value(rng)
        out[key] = value
    if rng.random() < 0.08:
        out[rng.choice(["bogus", "learning_rate", "", "R", 1, None, ("a",), 1.5])] = 1
    return out


YAML_SNIPPETS = [
    "lr: !!python/object/apply:os.system ['true']\n",
    "!!python/object/apply:os.system ['true']\n",
    "model: !!python/name:os.system\n",
    "data: !!binary aGVsbG8=\n",
    "targets: !!set {a, b}\n",
    "columns: !!omap [prompt: q]\n",
    "name: 2001-12-14\n",
    "lr: !!float .nan\n",
    "lr: .inf\n",
    "steps: 0x1F\n",
    "steps: 0o17\n",
    "steps: 1_000\n",
    "steps: +12\n",
    "lr: 1e400\n",
    "steps: !!int '12'\n",
    "steps: " + "9" * 5000 + "\n",
    "- a\n- b\n",
    "42\n",
    "'text'\n",
    "null\n",
    "~\n",
    "",
    "   \n",
    "---\n",
    "--- !!str\n",
    "[1, 2]\n",
    "lr: 1\n---\nsteps: 2\n",
    "a: &x [1, 2]\nb: *x\n",
    "method_args: *undefined\n",
    "lr:\t1\n\tsteps: 2\n",
    "lr: 1\nlr: 2\n",
    "1: 2\n",
    "null: 3\n",
    "[a]: 1\n",
    "? {a: 1}\n: 2\n",
    "true: 1\n",
    "1.5: x\n",
    "2001-01-01: x\n",
    "columns: {prompt: [q]}\n",
    "method_args: {rank_pattern: {'[': 4}}\n",
    "train_modules: {a: 1}\n",
    "train_modules: 5\n",
    "lr: 1e308\nepochs: 1e308\n",
    "targets: '('\n",
    "answer_pattern: '(a)(b)'\n",
    "prompt_template: '{'\n",
    "name: 'a/b'\n",
    "metric: 5\n",
    "max_length: 2147483648\n",
    "lr: [1, 2]\n",
    "lr: {a: 1}\n",
    "r: 1.5\n",
    "r: true\n",
    "r: -3\n",
    "dropout: 1.0\n",
    "alpha: 1e999\n",
    "progress: maybe\n",
    "%YAML 1.1\n---\nlr: 1\n",
    "%TAG ! tag:x,2000:\n---\nlr: !foo 1\n",
    "lr: !custom 1\n",
    "lr: &a 1\nsteps: *a\n",
    "lr: null\n",
    "batch_size: ~\n",
    "task:\n",
    "method: lora\nr: 4\nmethod_args: {dtype: int8}\n",
    "\ufefflr: 1\n",
]


YAML_KINDS = ["bytes", "deep-flow", "deep-block", "random", "plain", "snippet"]


def yaml_case(rng: random.Random, n: int) -> tuple[bytes, list[str]]:
    """A YAML file: a config dict dumped, then (for every other case, in turn) one of the
    `YAML_SNIPPETS` appended, or other damage."""
    import yaml

    steps = []
    body = {
        k: v
        for k, v in random_config_dict(rng).items()
        if isinstance(k, str)
        and isinstance(v, (str, int, float, bool, type(None), list, dict))
        and not (isinstance(v, list) and v and isinstance(v[0], list))
    }  # no deep lists: YAML dumps recurse
    try:
        textual = yaml.safe_dump(body, sort_keys=False, allow_unicode=rng.random() < 0.5)
    except Exception:  # noqa: BLE001 -- e.g. a huge int's repr: start from an empty document
        textual = ""
    snippet = forced(n, YAML_SNIPPETS, 0, slots=2, used=(0,))
    kind = "snippet" if snippet is not None else rng.choice(YAML_KINDS)
    if snippet is not None and rng.random() < 0.6:
        textual = ""  # the snippet alone: no other field's error comes first
    steps.append(kind)
    if kind == "snippet":
        textual += snippet if snippet is not None else rng.choice(YAML_SNIPPETS)
        steps.append(repr(snippet or "")[:60])
        if rng.random() < 0.3:
            textual += rng.choice(YAML_SNIPPETS)
    elif kind == "deep-flow":
        depth = rng.choice([100, 1000, 5000])
        textual += (
            rng.choice(["columns: ", "method_args: ", ""])
            + rng.choice(["[" * depth + "]" * depth, "{a: " * depth + "1" + "}" * depth])
            + "\n"
        )
    elif kind == "deep-block":
        depth = rng.choice([50, 150])
        textual += "".join("  " * d + "a:\n" for d in range(depth)) + "  " * depth + "1\n"
    raw = encode(textual)
    if kind == "random":
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    elif kind in ("bytes", "snippet") and rng.random() < (1.0 if kind == "bytes" else 0.3):
        raw, what = mutate_bytes(rng, raw)
        steps.append(what)
    return raw[:MAX_FILE_BYTES], steps


DICT_CASES = CONFIG_CASES // 2  # per chunk; the rest are YAML files


def build_config_case(case_id: str, directory: Path) -> tuple[str, Any, list[str]]:
    """("dict", the dict) or ("yaml", the written file) of case `case_id`, and what it holds."""
    rng = random.Random(case_id)
    _, chunk, i = case_id.split(":")
    if int(i) < DICT_CASES:  # every field leads in turn
        names = [f.name for f in dataclasses.fields(config_mod.TrainConfig)]
        value = random_config_dict(rng, names[(int(chunk) * DICT_CASES + int(i)) % len(names)])
        return "dict", value, [", ".join(f"{k!r}: {type(v).__name__}" for k, v in value.items())]
    raw, steps = yaml_case(rng, int(chunk) * (CONFIG_CASES - DICT_CASES) + int(i) - DICT_CASES)
    path = directory / "config.yaml"
    path.write_bytes(raw)
    return "yaml", path, steps


def config_result_problem(cfg: Any) -> str | None:
    """A checked config must hold what its fields declare: None only where the field is optional,
    no bool for an int, finite floats, ..."""
    import typing

    if not isinstance(cfg, config_mod.TrainConfig):
        return f"check_config returned {type(cfg).__name__}"
    kinds = config_mod.field_types()
    hints = typing.get_type_hints(config_mod.TrainConfig)
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), kinds[f.name]
        if value is None:
            if type(None) not in typing.get_args(hints[f.name]):
                return f"{f.name} = None, but the field is not optional ({hints[f.name]})"
            continue
        if kind is bool and type(value) is not bool:
            return f"{f.name} = {value!r} is not a bool"
        if kind is int and (type(value) is not int or abs(value) >= 2**31):
            return f"{f.name} = {value!r} is not a 32-bit int"
        if kind is float and (not isinstance(value, float) or not math.isfinite(value)):
            return f"{f.name} = {value!r} is not a finite float"
        if kind in (str, list, dict) and not isinstance(value, kind):
            return f"{f.name} = {value!r} is not a {kind.__name__}"
    return None


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_malformed_configs_give_a_config_or_one_line(chunk, tmp_path):
    from lorakit.train.method_config import check_config

    failures = []
    for i in range(CONFIG_CASES):
        case_id = f"config:{chunk}:{i}"
        directory = tmp_path / str(i)
        directory.mkdir()
        kind, value, steps = build_config_case(case_id, directory)
        label = f"[{case_id}] {kind} ({'; '.join(steps)[:200]})"
        try:
            with time_limit(10):
                given = config_mod.load_yaml(value) if kind == "yaml" else value
                cfg = check_config(config_mod.from_dict(given))
        except LorakitError as err:
            if not one_line(str(err)):
                failures.append(f"{label}: LorakitError message is not one line: {str(err)[:300]!r}")
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001
            failures.append(f"{label}: {describe(err)}")
            continue
        problem = config_result_problem(cfg)
        if problem:
            failures.append(f"{label}: accepted a wrong config: {problem}")
    report(failures, "config", CONFIG_CASES)


# --- family 3: adapter directories --------------------------------------------------------------

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.float8_e4m3fn,
    torch.complex64,
]
ST_DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I32",
    "I64",
    "BOOL",
    "U8",
    "I8",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "XX",
    "",
    5,
    None,
]
PICKLE = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
ADAPTER_KEYS = [
    "method",
    "r",
    "alpha",
    "dropout",
    "rslora",
    "init",
    "targets",
    "layers",
    "exclude",
    "train_modules",
    "dtype",
    "rank_pattern",
    "alpha_pattern",
    "init_r",
    "target_r",
    "bogus",
]
PEFT_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "target_modules",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "fan_in_fan_out",
    "task_type",
    "init_lora_weights",
    "base_model_name_or_path",
    "revision",
]


def adapter_value(rng: random.Random, key: str) -> Any:
    """A replacement for a config value: plausible edges for the key, or anything."""
    from lorakit.methods import METHODS

    pools: dict[str, list[Any]] = {
        "method": list(METHODS) + ["", "LoRA", "nope", None, 1],
        "peft_type": ["LORA", "ADALORA", "VERA", "IA3", "", "lora", None, 1],
        "r": [0, -1, 1, 2, 3, 5, 8, 64, 10**12, 2**63, 10**400, 1.5, 4.0, "4", True, None, Raw("NaN")],
        "alpha": [0, -1.0, 1e308, Raw("1e400"), Raw("NaN"), Raw("-Infinity"), "16", None, 10**400, True],
        "dropout": [0.0, 0.5, 1.0, -0.1, 2, Raw("NaN"), "0.1", None, 10**400],
        "targets": [
            [],
            ["q_proj"],
            ["nope"],
            ["lm_head"],
            ["embed_tokens"],
            ["model"],
            "all-linear",
            ".*",
            "(",
            "q_proj",
            [1],
            [None],
            ["q_proj", 1],
            "",
            ["model.layers.0.self_attn.q_proj"],
            ["norm"],
            ["mlp"],
        ],
        "layers": [[0], [5], [-1], ["0"], [10**400], [True], 0, "0", [], [None], [1.5]],
        "exclude": [["q_proj"], ["v_proj", "q_proj"], "q_proj", [1], [], [None]],
        "train_modules": [["lm_head"], ["nope"], [""], ["model"], ["model.norm"], "lm_head", [1], [None], ["."]],
        "dtype": ["float16", "bfloat16", "float64", "int8", "float128", "", None, 1, "complex64"],
        "init": ["default", "loftq", "pissa", "", None, 1, "gaussian"],
        "rank_pattern": [
            {"q_proj": 2},
            {"q_proj": 0},
            {"[": 2},
            {"q_proj": "2"},
            {"q_proj": 10**400},
            {"": 1},
            {"q_proj": 2.5},
            [],
            "q_proj",
            {"(": 1},
            {"v_proj": -1},
            {"q_proj": None},
        ],
        "alpha_pattern": [{"q_proj": 2.0}, {"[": 2.0}, {"q_proj": "x"}, {"q_proj": Raw("NaN")}, [], {"q_proj": None}],
        "adapted_modules": [
            [],
            ["nope"],
            ["model.layers.0.self_attn.q_proj"],
            [1],
            [None],
            "q_proj",
            [""],
            [".*"],
            ["lm_head"],
            ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"],
        ],
        "quantization": [
            {"method": "nf4"},
            {"method": "int8"},
            {"bogus": 1},
            {"blocksize": 0},
            {"blocksize": 7},
            {"compute_dtype": "float32"},
            {"compute_dtype": "int8"},
            {"targets": ["q_proj"]},
            [],
            "nf4",
            1,
            {"method": "nf4", "double_quant": "no"},
            {"layers": ["x"]},
        ],
        "adapter_name": ["default", "other", "", None, 1, "__base__"],
    }
    pool = pools.get(key, [])
    if pool and rng.random() < 0.7:
        return rng.choice(pool)
    return rng.choice(
        [
            None,
            True,
            0,
            -1,
            10**400,
            Raw("NaN"),
            Raw("1e400"),
            "",
            "x",
            [],
            {},
            [1, "a"],
            {"a": None},
            deep(rng.choice([10, 3000])),
            "\ud800",
            "x" * 3000,
        ]
    )


OWN_TOP_KEYS = ["config", "adapted_modules", "quantization", "adapter_name", "base_model_name_or_path"]


def mutate_json_config(rng: random.Random, meta: dict[str, Any], peft: bool, key: str | None = None) -> tuple[Any, str]:
    """Damage one adapter config (lorakit.json or adapter_config.json): a value (of `key`, when
    given: "r", or "config.r" inside lorakit.json's config), a key, or the whole."""
    if key is not None:
        target = meta
        if key.startswith("config.") and isinstance(meta.get("config"), dict):
            target, key = meta["config"], key[len("config.") :]
        target[key] = adapter_value(rng, key)
        return meta, f"{key}={target[key]!r}"[:80]
    kind = rng.choice(["set", "set", "set", "delete", "add", "whole"])
    target = meta if peft or not isinstance(meta.get("config"), dict) or rng.random() < 0.3 else meta["config"]
    keys = PEFT_KEYS if peft else (ADAPTER_KEYS if target is not meta else OWN_TOP_KEYS)
    if kind == "set":
        key = rng.choice(keys)
        target[key] = adapter_value(rng, key)
        return meta, f"{key}={target[key]!r}"[:80]
    if kind == "delete" and target:
        key = rng.choice(list(target))
        del target[key]
        return meta, f"del {key}"
    if kind == "add":
        key = rng.choice(["bogus", "", "r ", "\ud800", "config", "method"])
        target[key] = adapter_value(rng, key)
        return meta, f"add {key!r}"
    return rng.choice([[], [1, 2], None, 3, "x", {}, deep(rng.choice([20, 20_000]))]), "whole"


def write_json_file(rng: random.Random, path: Path, value: Any) -> None:
    raw = encode(dump_json(value, rng.random() < 0.7))
    if rng.random() < 0.2:
        raw, _ = mutate_bytes(rng, raw)
    path.write_bytes(raw)


def safetensors_header(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        return json.loads(raw[8 : 8 + n]), raw[8 + n :]
    except ValueError:
        return None


HEADER_DAMAGE = ["dtype", "shape", "offsets", "metadata", "drop", "whole", "length"]
TENSOR_DAMAGE = ["shape", "dtype", "values", "drop", "add", "rename", "empty"]
WEIGHT_BYTE_DAMAGE = ["truncate", "flip", "pickle", "empty", "random", "pad", "flip-header"]
FILE_DAMAGE = ["del-weights", "del-own", "del-both", "bin", "weights-dir", "own-dir", "subdir"]
ADAPTER_DAMAGE = (
    [("weights-bytes", k) for k in WEIGHT_BYTE_DAMAGE]
    + [("header", k) for k in HEADER_DAMAGE]
    + [("tensors", k) for k in TENSOR_DAMAGE]
    + [("files", k) for k in FILE_DAMAGE]
    + [("own-json", None)] * 3
    + [("own-json", k) for k in OWN_TOP_KEYS[1:4]]
    + [("own-json", f"config.{k}") for k in ADAPTER_KEYS]
    + [("peft-json", None)] * 2
    + [("peft-json", k) for k in PEFT_KEYS[:11]]
)


def mutate_header(rng: random.Random, raw: bytes, kind: str | None = None) -> tuple[bytes, str]:
    """Edit the JSON header of a safetensors file (dtype, shape, offsets, metadata) and re-pack it."""
    parsed = safetensors_header(raw)
    if parsed is None:
        return raw, "no-header"
    header, body = parsed
    names = [k for k in header if k != "__metadata__"]
    kind = kind or rng.choice(HEADER_DAMAGE)
    name = rng.choice(names) if names else None
    if kind == "dtype" and name:
        header[name]["dtype"] = rng.choice(ST_DTYPES)
    elif kind == "shape" and name:
        header[name]["shape"] = rng.choice(
            [[], [0], [-1, 4], [4], [2**40, 2**40], [10**20], ["4"], [4, 32, 1], None, 4]
        )
    elif kind == "offsets" and name:
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice(
            [
                [end, start],
                [0, 0],
                [start, end + 4],
                [-4, end],
                [start, 10**12],
                [start],
                None,
                ["0", "4"],
                [0, len(body)],
            ]
        )
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, {"a": None}, [], "x", {"format": "np"}])
    elif kind == "drop" and name:
        del header[name]
    elif kind == "whole":
        header = rng.choice([[], None, "x", {}, {"a": 1}, {"a": {"dtype": "F32"}}])
    if kind == "length":
        new = rng.choice([0, 1, 7, len(raw), len(raw) - 8, 2**63, 2**64 - 1, 10**15])
        return struct.pack("<Q", new) + raw[8:], f"header-length={new}"
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + body, f"header-{kind}"


def mutate_tensors(rng: random.Random, path: Path, kind: str | None = None) -> str:
    """Rewrite the weights with other shapes, dtypes, values or names (a valid safetensors file)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    names = sorted(tensors)
    kind = kind or rng.choice(TENSOR_DAMAGE + ["shape", "dtype"])
    name = rng.choice(names) if names else None
    if kind == "shape" and name:
        t = tensors[name]
        tensors[name] = rng.choice(
            [
                t.T.contiguous(),
                t.reshape(-1),
                t.unsqueeze(0),
                torch.zeros(0, t.shape[-1]),
                torch.zeros(t.shape[0], 0),
                torch.zeros(2, 3),
                torch.zeros(()),
                torch.zeros(t.shape[0] + 1, t.shape[1]),
            ]
        )
    elif kind == "dtype" and name:
        tensors[name] = tensors[name].to(rng.choice(DTYPES))
    elif kind == "values" and name:
        tensors[name] = torch.full_like(
            tensors[name], rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, 0.0])
        )
    elif kind == "drop" and name:
        del tensors[name]
    elif kind == "add":
        extra = rng.choice(
            [
                "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                "junk",
                "base_model.model.lm_head.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_E",
                "",
            ]
        )
        tensors[extra] = torch.zeros(4, 32)
    elif kind == "rename" and name:
        tensors[name.replace("lora_A", "lora_a").replace("q_proj", "k_proj")] = tensors.pop(name)
    elif kind == "empty":
        tensors = {}
    save_file(tensors, str(path), metadata=rng.choice([{"format": "pt"}, None, {"format": "tf"}]))
    return f"tensors-{kind}"


def damage_adapter(rng: random.Random, directory: Path, first: tuple[str, str | None] | None = None) -> list[str]:
    """Apply 1-3 kinds of damage to the adapter saved in `directory` (the first one `first`, when given)."""
    weights, own, peft = (
        directory / "adapter_model.safetensors",
        directory / "lorakit.json",
        directory / "adapter_config.json",
    )
    steps = []
    for number in range(rng.choice([1, 1, 2, 3])):
        kind, sub = first if first and number == 0 else rng.choice(ADAPTER_DAMAGE)
        if kind == "weights-bytes" and weights.is_file():
            raw = weights.read_bytes()
            choice = sub or rng.choice(WEIGHT_BYTE_DAMAGE)
            choice = choice if raw else "random"
            if choice == "truncate":
                raw = raw[: rng.randint(0, len(raw) - 1)]
            elif choice == "flip":
                buf = bytearray(raw)
                for _ in range(rng.randint(1, 8)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
                raw = bytes(buf)
            elif choice == "flip-header":
                n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
                buf = bytearray(raw)
                if 8 + n <= len(buf) and n:
                    buf[8 + rng.randrange(n)] = rng.choice([0xFF, 0x00, ord('"'), ord("{"), ord("9")])
                raw = bytes(buf)
            elif choice == "pickle":
                raw = PICKLE
            elif choice == "empty":
                raw = b""
            elif choice == "random":
                raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            else:
                raw = raw + b"\x00" * rng.randint(1, 64)
            weights.write_bytes(raw)
            steps.append(f"weights-{choice}")
        elif kind == "header" and weights.is_file():
            raw, what = mutate_header(rng, weights.read_bytes(), sub)
            weights.write_bytes(raw)
            steps.append(what)
        elif kind == "tensors" and weights.is_file() and safetensors_header(weights.read_bytes()) is not None:
            try:
                steps.append(mutate_tensors(rng, weights, sub))
            except Exception:  # noqa: BLE001 -- the file was already damaged beyond reading: leave it so
                steps.append("tensors-unreadable")
        elif kind in ("own-json", "peft-json"):
            path = own if kind == "own-json" else peft
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError):
                continue
            if not isinstance(meta, dict):  # damaged already
                continue
            if kind == "peft-json" and rng.random() < 0.6 and own.is_file():
                own.unlink()  # so that adapter_config.json is the file read
                steps.append("del lorakit.json")
            value, what = mutate_json_config(rng, meta, kind == "peft-json", sub)
            write_json_file(rng, path, value)
            steps.append(f"{path.name}:{what}")
        elif kind == "files":
            choice = sub or rng.choice(FILE_DAMAGE + ["subdir"])
            if choice == "del-weights" and weights.is_file():
                weights.unlink()
            elif choice == "del-own" and own.is_file():
                own.unlink()
            elif choice == "del-both":
                for p in (own, peft):
                    if p.is_file():
                        p.unlink()
            elif choice == "bin":
                (directory / "adapter_model.bin").write_bytes(PICKLE)
                if weights.is_file() and rng.random() < 0.5:
                    weights.unlink()
            elif choice == "weights-dir" and weights.is_file():
                weights.unlink()
                weights.mkdir()
            elif choice == "own-dir" and own.is_file():
                own.unlink()
                own.mkdir()
            elif choice == "subdir":
                child = directory / rng.choice(["second", "default", "1bad", "__base__", "x y", "é", "adapter", "-"])
                if not child.exists():
                    shutil.copytree(
                        directory, child, ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()]
                    )
            steps.append(choice)
    return steps


def build_adapter_case(case_id: str, template: Path, directory: Path, per_chunk: int = ADAPTER_CASES) -> list[str]:
    """Copy the adapter saved in `template` to `directory` and damage it as case `case_id` says
    (every kind of damage leads in turn)."""
    shutil.copytree(template, directory)
    first = ADAPTER_DAMAGE[case_number(case_id, per_chunk) % len(ADAPTER_DAMAGE)]
    return damage_adapter(random.Random(case_id), directory, first)


def tiny_input(vocab: int) -> torch.Tensor:
    return torch.arange(6).reshape(1, 6) % vocab


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory) -> Path:
    from conftest import tiny_llama

    directory = tmp_path_factory.mktemp("fuzz-adapter") / "good"
    lorakit.save(lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"])), directory)
    return directory


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_damaged_adapter_directories_load_or_raise_one_documented_line(chunk, tmp_path, adapter_template):
    from conftest import tiny_llama

    failures = []
    for i in range(ADAPTER_CASES):
        case_id = f"adapter:{chunk}:{i}"
        directory = tmp_path / str(i)
        steps = build_adapter_case(case_id, adapter_template, directory)
        label = f"[{case_id}] ({', '.join(steps)})"
        model = tiny_llama()
        try:
            with time_limit(20):
                lorakit.load(model, directory)
                with torch.no_grad():
                    logits = model(tiny_input(model.config.vocab_size)).logits
        except (ValueError, FileNotFoundError, KeyError) as err:
            if not one_line(str(err)):
                failures.append(f"{label}: {type(err).__name__} message is not one line: {str(err)[:300]!r}")
            elif lorakit.inject.adapter_names(model):
                failures.append(
                    f"{label}: {type(err).__name__} raised, but adapters {lorakit.inject.adapter_names(model)} "
                    "stayed on the model"
                )
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001
            failures.append(f"{label}: {describe(err)}")
            continue
        if not lorakit.inject.adapter_names(model) or tuple(logits.shape) != (1, 6, model.config.vocab_size):
            failures.append(
                f"{label}: loaded, but adapters {lorakit.inject.adapter_names(model)}, logits {tuple(logits.shape)}"
            )
    report(failures, "adapter", ADAPTER_CASES)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model directory and a valid adapter saved on it."""
    from transformers import AutoModelForCausalLM

    from tiny_lm import save_tiny_llama

    root = tmp_path_factory.mktemp("fuzz-cli")
    model_dir = save_tiny_llama(root / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = root / "adapter"
    lorakit.save(lorakit.adapt(model, lorakit.LoRA(r=4, targets=["q_proj", "v_proj"])), adapter)
    return model_dir, adapter


@pytest.mark.parametrize("chunk", range(CLI_CHUNKS))
def test_lorakit_eval_on_damaged_adapters_exits_0_or_one_error_line(chunk, tmp_path, cli_model, capsys):
    """`lorakit eval` on a damaged adapter: status 0, or 2 with `error: ...` as the only line on
    stderr (a `warning: ` line naming another recorded base model may come before it)."""
    from lorakit import cli

    model_dir, template = cli_model
    failures = []
    for i in range(CLI_CASES):
        case_id = f"cli:{chunk}:{i}"
        directory = tmp_path / str(i)
        steps = build_adapter_case(case_id, template, directory, CLI_CASES)
        label = f"[{case_id}] ({', '.join(steps)})"
        capsys.readouterr()
        try:
            with time_limit(60):
                status = cli.main(
                    ["eval", "--adapter", str(directory), "--model", str(model_dir), "--max-examples", "2"]
                )
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001
            failures.append(f"{label}: {describe(err)}")
            continue
        out, err_text = capsys.readouterr()
        lines = [line for line in err_text.splitlines() if not line.startswith("warning: ")]
        if status == 2:
            if len(lines) != 1 or not lines[0].startswith("error: "):
                failures.append(f"{label}: exit 2 with stderr {err_text[:400]!r}")
        elif status == 0:
            if "held-out examples" not in out:
                failures.append(f"{label}: exit 0 without the metrics line: stdout {out[:200]!r}")
        else:
            failures.append(f"{label}: exit status {status}, stderr {err_text[:300]!r}")
    report(failures, "CLI", CLI_CASES)
