"""Seeded fuzzing of the flags that take structured values: compare's `--method-arg [METHOD:]KEY=VALUE`,
`--columns ROLE=COLUMN,...` and `--nproc N` (validation only: nothing is launched or trained).

The contract, as for tests/test_fuzz.py (whose machinery this reuses): a checked config, or exit
status 2 with one `error: ...` line on stderr; never a traceback. Cases come from
`random.Random("<family>:<n>")`, so a failure names the case that rebuilds it.
"""

from __future__ import annotations

import random

import pytest

from lorakit import cli
from test_fuzz import describe, report

CASES = 60
METHODS = ["lora", "dora", "vera", "adalora", "lora-fa", "delta-lora", "lora-drop", "qlora", "lora-plus"]
KEYS = [
    "r",
    "alpha",
    "dropout",
    "lr",
    "init",
    "rslora",
    "targets",
    "quantize",
    "loraplus_ratio",
    "init_r",
    "target_r",
    "steps",
    "seed",
    "data",
    "d_initial",
    "projection_prng_key",
    "rank_pattern",
    "",
    "r ",
    " r",
    "R",
    "lr=1",
    "x",
]
VALUES = [
    "4",
    "0",
    "-1",
    "1e-3",
    "1e39",
    "nan",
    "inf",
    "-inf",
    "true",
    "no",
    "null",
    "",
    " ",
    "[1, 2]",
    "{a: 1}",
    "{",
    "9" * 30,
    "q_proj,v_proj",
    "gaussian",
    "loftq",
    "nf4",
    "é",
    "\x00",
    "'quoted'",
    "1_000",
    "0x10",
    "=",
    ":",
]
ROLES = [
    "text",
    "label",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "messages",
    "text_pair",
    "txt",
    "",
    " ",
]


class Reached(Exception):
    """compare got past every check: the flags were valid (nothing is trained)."""


def token(rng: random.Random, pool: list[str]) -> str:
    if rng.random() < 0.1:
        return "".join(rng.choice("=:,. \t-_aZ9é") for _ in range(rng.randint(0, 6)))
    return rng.choice(pool)


VALID = {
    "r": ["2", "4", "8"],
    "alpha": ["8", "16.0"],
    "dropout": ["0", "0.1"],
    "lr": ["1e-3", "0.01"],
    "targets": ["q_proj,v_proj", "all-linear"],
}


def method_arg(rng: random.Random, methods: list[str]) -> str:
    key, value = token(rng, KEYS), token(rng, VALUES)
    if rng.random() < 0.5:  # a plausible setting, so that half the cases get past the parser to the checks
        key = rng.choice(list(VALID))
        value = rng.choice(VALID[key] + [token(rng, VALUES)])
    shape = rng.random()
    if shape < 0.5:
        return f"{rng.choice(methods + ['nosuch', ''])}:{key}={value}"
    if shape < 0.9:
        return f"{key}={value}"
    return rng.choice([key, f"{key}:", f":{key}={value}", f"{key}=={value}"])


def outcome(argv: list[str], capsys) -> str | None:
    """None when `lorakit ARGV` ended as the contract says, else what went wrong."""
    try:
        code = cli.main(argv)
    except Reached:
        return None
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception as err:  # noqa: BLE001 -- the failure under test
        return f"raised {describe(err)}"
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    if code == 0 and "--print-config" in argv:
        return None if out.strip() else "exit 0 without the printed config"
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 2000:
        return None
    return f"exit {code} with stderr {err[-300:]!r}"


@pytest.fixture
def no_training(monkeypatch):
    from lorakit import compare

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(compare, "compare", stop)


def test_compare_method_args(no_training, capsys, tmp_path):
    failures = []
    for n in range(CASES):
        rng = random.Random(f"method-arg:{n}")
        methods = rng.sample(METHODS, rng.randint(1, 3))
        argv = ["compare", "--methods", ",".join(methods), "--steps", "1", "--no-html", "--out-dir", str(tmp_path)]
        for _ in range(rng.randint(1, 3)):
            argv += ["--method-arg", method_arg(rng, methods)]
        problem = outcome(argv, capsys)
        if problem:
            failures.append(f"[method-arg:{n}] {argv[8:]}: {problem}")
    report(failures, "--method-arg", CASES)


def test_columns_mappings(capsys, tmp_path):
    (tmp_path / "d.csv").write_text("sentence,label,x\ngood,1,a\nbad,0,b\n")
    failures = []
    for n in range(CASES):
        rng = random.Random(f"columns:{n}")
        parts = [
            f"{token(rng, ROLES)}{rng.choice(['=', '=', '==', ':', ''])}{token(rng, ['sentence', 'label', 'x', 'nosuch', '', '0'])}"
            for _ in range(rng.randint(1, 4))
        ]
        text = rng.choice([",", ", ", ",,"]).join(parts)
        argv = [
            "train",
            "--task",
            rng.choice(["classify", "causal-lm"]),
            "--data",
            str(tmp_path / "d.csv"),
            "--columns",
            text,
            "--print-config",
        ]
        problem = outcome(argv, capsys)
        if problem:
            failures.append(f"[columns:{n}] --columns {text!r}: {problem}")
    report(failures, "--columns", CASES)


def test_nproc_settings(capsys):
    failures = []
    for n in range(CASES // 2):
        rng = random.Random(f"nproc:{n}")
        value = rng.choice(["0", "-1", "1", "2", "1.5", "", "two", "9" * 40, " 2", "2 ", "0x2", "+2", "1e3", "\x00"])
        argv = ["train", "--nproc", value, "--steps", "1", "--print-config"]
        problem = outcome(argv, capsys)
        if problem:
            failures.append(f"[nproc:{n}] --nproc {value!r}: {problem}")
    report(failures, "--nproc", CASES // 2)
