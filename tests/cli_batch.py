"""Several `lorakit` commands in one process (one import of torch and transformers for all), for tests
that must run them somewhere special (a small disk in its own mount namespace):

    python tests/cli_batch.py COMMANDS.json RESULTS.json

COMMANDS.json holds a list of argument lists; RESULTS.json gets, for each, its exit status and what it
printed on stderr (an exception that escaped `lorakit.cli.main` as a traceback).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from lorakit import cli


def run(argv: list[str]) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 -- what the test is looking for
            traceback.print_exc()
            code = "traceback"
    return {"argv": argv, "code": code, "stderr": err.getvalue()}


def main(commands: str, results: str) -> None:
    with open(commands) as f:
        done = [run(argv) for argv in json.load(f)]
    with open(results, "w") as f:
        json.dump(done, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
