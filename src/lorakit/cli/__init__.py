"""The `lorakit` command line: train, eval, generate, merge, export, inspect, compare.

    lorakit train                                # the built-in job: SmolLM2-135M learns a task
    lorakit train --data my.jsonl --method dora --r 16 --steps 300
    lorakit train --config run.yaml --lr 1e-3    # flags override the file
    lorakit train --print-config                 # the resolved config, as YAML
    lorakit eval --adapter runs/<name>
    lorakit generate --adapter runs/<name> "Reverse the order of the words: a b c"
    lorakit generate --adapter sql=runs/a --adapter chat=runs/b --prompts prompts.jsonl   # per-prompt adapter
    lorakit merge --adapter runs/<name> --out merged/
    lorakit export --adapter runs/<name> --format gguf           # a LoRA adapter for llama.cpp (--lora FILE)
    lorakit inspect runs/<name>                  # what the adapter changed, module by module
    lorakit compare --methods lora,dora,vera     # the same job with each method: table + HTML report

Errors in the user's input print one line, `error: ...`, and exit with status 2.

One module a command (`train`, `eval`, `compare`, `inspect`, `generate`, `merge`, `export`), what the
adapter-loading commands share (`adapters`), and the parser (`parser`). Importing this package loads
no torch: the commands import what they need when they run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..errors import LorakitError
from .adapters import load_adapted
from .parser import EXIT_ERROR, build_parser
from .train import resolve_train_config

EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lorakit` command; returns the exit status."""
    interrupted = []

    def on_interrupt(signum, frame) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    # Ctrl-C as Python's own handler takes it, remembered: a Ctrl-C that lands inside an extension
    # module's import (torch importing numpy) can surface as another error, still the user's Ctrl-C
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    previous = signal.default_int_handler if previous is None else previous  # None: set outside Python
    try:
        from ..children import follow_parent

        follow_parent()  # a child of `lorakit compare` or of `--nproc` ends with its parent
        given = list(sys.argv[1:] if argv is None else argv)
        command = next((a for a in given if not a.startswith("-")), "")
        args = build_parser(command).parse_args(given)  # `lorakit train --help` imports the methods (and torch)
        args.argv = given
        return args.func(args)
    except LorakitError as err:
        from ..train.launch import report_error
        from ..train.loop import TrainingInterrupted

        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        where = f"[process {rank}] " if rank else ""
        line = f"error: {where}{err}" if not isinstance(err, TrainingInterrupted) else str(err)
        line = line.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a path or value holds
        if not report_error(line):  # one of `--nproc`'s processes: the launcher prints it, once
            print(line, file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(err, TrainingInterrupted) else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lorakit ... | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush has somewhere to go
        return EXIT_ERROR
    except Exception:
        if not interrupted:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "load_adapted", "main", "resolve_train_config"]
