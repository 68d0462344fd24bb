"""Seeded fuzzing of `lorakit inspect` and `lorakit explain` on damaged adapter directories (the same
damage tests/test_fuzz.py does to the adapters `lorakit eval` reads): status 0 with the command's
summary, or 2 with `error: ...` as the only line on stderr (a `warning: ` line naming another recorded
base model may come before it); never a traceback, and no report written by a refused command.
"""

from __future__ import annotations

import shutil

import pytest

from lorakit import cli
from test_fuzz import build_adapter_case, cli_model, describe, report, time_limit  # noqa: F401  (cli_model: a fixture)

CASES = 12
COMMANDS = {
    "inspect": lambda adapter, model, out: [
        "inspect",
        adapter,
        "--model",
        model,
        "--no-html",
        "--no-progress",
        "--json",
        out,
    ],
    "explain": lambda adapter, model, out: [
        "explain",
        "--adapter",
        adapter,
        "--model",
        model,
        "--max-new-tokens",
        "2",
        "--steps",
        "2",
        "--json",
        out,
        "Reverse: a b",
    ],
}
SUMMARY = {"inspect": "relative change", "explain": "output"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_on_damaged_adapters_exit_0_or_one_error_line(command, tmp_path, cli_model, capsys):
    model_dir, template = cli_model
    failures = []
    for i in range(CASES):
        case_id = f"{command}:{list(COMMANDS).index(command)}:{i}"  # each command its own kinds of damage
        directory = tmp_path / str(i)
        if i % 4 == 0:  # an intact adapter: the command must run
            shutil.copytree(template, directory)
            steps = ["intact"]
        else:
            steps = build_adapter_case(case_id, template, directory, CASES)
        label = f"[{case_id}] ({', '.join(steps)})"
        out_file = tmp_path / f"{i}.json"
        capsys.readouterr()
        try:
            with time_limit(60):
                status = cli.main(COMMANDS[command](str(directory), str(model_dir), str(out_file)))
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 -- the failure under test
            failures.append(f"{label}: {describe(err)}")
            continue
        out, err_text = capsys.readouterr()
        lines = [line for line in err_text.splitlines() if not line.startswith("warning: ")]
        if steps == ["intact"] and status != 0:
            failures.append(f"{label}: exit {status} on an intact adapter: {err_text[-300:]!r}")
        elif status == 2:
            if len(lines) != 1 or not lines[0].startswith("error: "):
                failures.append(f"{label}: exit 2 with stderr {err_text[:400]!r}")
            elif out_file.exists():
                failures.append(f"{label}: refused ({lines[0][:200]}) but wrote {out_file.name}")
        elif status == 0:
            if SUMMARY[command] not in out or not out_file.is_file():
                failures.append(f"{label}: exit 0 without the summary or the JSON file: stdout {out[:200]!r}")
        else:
            failures.append(f"{label}: exit status {status}, stderr {err_text[:300]!r}")
    report(failures, command, CASES)
