"""Seeded fuzzing of `lorakit generate --prompts FILE` (JSON Lines of {"prompt", "adapter"} records) and
`lorakit explain --prompts FILE` (JSON lines of {"prompt", "completion", "text_pair", "label"} and plain
lines), with wrong types, unknown keys, deep or huge JSON, lone surrogates, other encodings and byte damage.

The contract (tests/test_fuzz.py's machinery): the jobs, each an (adapter that is loaded, string
prompt) pair, or one `LorakitError` line naming the file; a sample through the command itself with
a tiny model: exit 0 with one JSON line per prompt, or 2 with one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest

import lorakit.inject  # noqa: F401  (here, once: each forked case would import torch for prompt_jobs' names)
from lorakit import cli
from lorakit.cli.generate import prompt_jobs
from test_fuzz import Raw, deep, dump_json, mutate_bytes, one_line, report, run_isolated
from tiny_lm import save_tiny_llama

CASES = 200
CLI_CASES = 6
NAMES = ["sql", "chat"]


def value(rng: random.Random):
    return rng.choice(
        [
            "hello",
            "",
            " ",
            "é✓ 中文",
            "\ud800",
            "a\nb",
            "{",
            "x" * 3000,
            5,
            1.5,
            True,
            None,
            [],
            ["a"],
            {"a": 1},
            Raw("NaN"),
            Raw("1e400"),
            Raw("9" * 5000),
            deep(rng.choice([10, 2000, 100_000])),
        ]
    )


def record(rng: random.Random, odd: float = 1.0, names: tuple[str, ...] = (*NAMES, "__base__")) -> dict:
    rec = {}
    if rng.random() < 1 - 0.15 * odd:
        rec["prompt"] = rng.choice(["Reverse: a b", "hello world", ""]) if rng.random() > 0.4 * odd else value(rng)
    if rng.random() < 0.5:
        rec["adapter"] = (
            rng.choice([*names, "nosuch", "Chat", ""] if rng.random() < odd else names)
            if rng.random() > 0.3 * odd
            else value(rng)
        )
    if rng.random() < 0.1 * odd:
        rec[rng.choice(["adaptor", "Prompt", "text", "", "prompt "])] = "x"
    return rec


def prompt_file(
    rng: random.Random, odd: float = 1.0, names: tuple[str, ...] = (*NAMES, "__base__")
) -> tuple[bytes, str]:
    """A prompts file naming the adapters `names`; `odd` (0 to 1) scales how often a value is of a wrong
    kind or the bytes are damaged."""
    kind = rng.choice(["jsonl", "jsonl", "plain", "mixed"] if odd >= 0.5 else ["jsonl", "plain"])
    lines = []
    for _ in range(rng.randint(1, 6)):
        if kind == "plain" or (kind == "mixed" and rng.random() < 0.4):
            lines.append(rng.choice(["a plain prompt", "[1, 2]", "null", "  ", "", '"quoted"', "{ not json"]))
        else:
            lines.append(dump_json(record(rng, odd, names), ensure_ascii=rng.random() < 0.5))
    raw = ("\n".join(lines) + rng.choice(["\n", "", "\n\n"])).encode("utf-8", errors="surrogatepass")
    damage = "none"
    if rng.random() < 0.35 * odd:
        raw, damage = mutate_bytes(rng, raw)
    return raw, f"{kind}, {damage}"


def check_jobs(path: str) -> str | None:
    from lorakit.errors import LorakitError

    try:
        jobs = prompt_jobs(argparse.Namespace(prompts=path, prompt=None, use=None), NAMES)
    except LorakitError as err:
        return None if one_line(str(err)) and len(str(err)) < 1000 else f"error not one short line: {str(err)[:200]!r}"
    if not jobs:
        return "no jobs and no error"
    for name, prompt in jobs:
        if name not in NAMES + ["__base__"] or not takeable(prompt):
            return f"job {(name, prompt)!r}"
    return None


def takeable(text) -> bool:
    """A string a tokenizer takes (no lone surrogate)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_prompt_files_give_jobs_or_one_line(tmp_path):
    failures = []
    for n in range(CASES):
        rng = random.Random(f"prompts:{n}")
        raw, what = prompt_file(rng)
        path = tmp_path / f"{n}{rng.choice(['.jsonl', '.txt', ''])}"
        path.write_bytes(raw)
        outcome = run_isolated(lambda: check_jobs(str(path)), 20)
        problem = (
            outcome[1]
            if outcome[0] == "ok"
            else (
                f"{outcome[1]}: {outcome[2][:200]!r} at {outcome[3]}"
                if outcome[0] == "raised"
                else f"{outcome[0]}: {outcome[1]}"
            )
        )
        if problem:
            failures.append(f"[prompts:{n}] ({what}): {problem}")
    report(failures, "--prompts", CASES)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def test_generate_with_prompt_files_exits_0_or_one_error_line(tiny_model, tmp_path, capsys):
    failures = []
    for n in range(CLI_CASES):
        rng = random.Random(f"prompts-cli:{n}")
        raw, what = prompt_file(rng, odd=0.2, names=("__base__",))  # mostly usable files: the model runs on them
        path = tmp_path / f"{n}{'.txt' if what.startswith('plain') else '.jsonl'}"
        path.write_bytes(raw)
        try:
            code = cli.main(["generate", "--model", tiny_model, "--prompts", str(path), "--max-new-tokens", "2"])
        except Exception as err:  # noqa: BLE001 -- the failure under test
            failures.append(f"[prompts-cli:{n}] ({what}): raised {type(err).__name__}: {err!s:.200}")
            continue
        out, err = capsys.readouterr()
        lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
        if code == 0:
            bad = [line for line in out.splitlines() if not isinstance(json.loads(line), dict)]
            if bad or not out.strip():
                failures.append(f"[prompts-cli:{n}] ({what}): exit 0 with output {out[:200]!r}")
        elif not (code == 2 and len(lines) == 1 and lines[0].startswith("error: ")):
            failures.append(f"[prompts-cli:{n}] ({what}): exit {code} with stderr {err[-300:]!r}")
    report(failures, "generate --prompts", CLI_CASES)


EXPLAIN_KEYS = ["prompt", "text", "completion", "text_pair", "label"]


def explain_file(rng: random.Random) -> tuple[bytes, str]:
    """An explain --prompts file: JSON lines of its keys (some misspelt, some of wrong kinds) and plain lines."""
    lines = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.3:
            lines.append(
                rng.choice(["a plain prompt", "[1, 2]", "null", "  ", "", '"quoted"', "{ not json", "\\ud800"])
            )
            continue
        rec = {}
        for key in rng.sample(EXPLAIN_KEYS + ["promt", "Label", "completon"], rng.randint(0, 4)):
            rec[key] = rng.choice(["Say dog:", " dog", "pos", 1, -1]) if rng.random() < 0.6 else value(rng)
        if rng.random() < 0.3:
            rec["prompt"] = rng.choice(["a\ud800b", "ok", "\udc80"])
        lines.append(dump_json(rec, ensure_ascii=rng.random() < 0.5))
    raw = ("\n".join(lines) + "\n").encode("utf-8", errors="surrogatepass")
    damage = "none"
    if rng.random() < 0.3:
        raw, damage = mutate_bytes(rng, raw)
    return raw, damage


def check_explain_jobs(path: str) -> str | None:
    from lorakit.cli.explain import read_jobs
    from lorakit.errors import LorakitError

    args = argparse.Namespace(prompts=path, prompt=None, completion=None, text_pair=None, label=None)
    try:
        jobs = read_jobs(args)
    except LorakitError as err:
        return None if one_line(str(err)) and len(str(err)) < 1000 else f"error not one short line: {str(err)[:200]!r}"
    for job in jobs:
        if not (takeable(job.prompt) and job.prompt.strip()):
            return f"prompt {job.prompt!r}"
        for text in (job.completion, job.text_pair):
            if text is not None and not takeable(text):
                return f"text {text!r}"
        if job.label is not None and (
            isinstance(job.label, bool) or not (isinstance(job.label, int) or takeable(job.label))
        ):
            return f"label {job.label!r}"
    return None if jobs else "no jobs and no error"


def test_explain_prompt_files_give_jobs_or_one_line(tmp_path):
    failures = []
    for n in range(CASES):
        rng = random.Random(f"explain-prompts:{n}")
        raw, what = explain_file(rng)
        path = tmp_path / f"{n}.jsonl"
        path.write_bytes(raw)
        outcome = run_isolated(lambda: check_explain_jobs(str(path)), 20)
        problem = (
            outcome[1]
            if outcome[0] == "ok"
            else (
                f"{outcome[1]}: {outcome[2][:200]!r} at {outcome[3]}"
                if outcome[0] == "raised"
                else f"{outcome[0]}: {outcome[1]}"
            )
        )
        if problem:
            failures.append(f"[explain-prompts:{n}] ({what}): {problem}")
    report(failures, "explain --prompts", CASES)
