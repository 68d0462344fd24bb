"""The `lorakit` argument parser: one sub-command a module (`cli/<command>.py`), config flags made
from `TrainConfig`'s fields, and usage mistakes as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys

from ..errors import LorakitError, did_you_mean, short_repr
from ..train import config as config_mod
from ..train.config import TrainConfig
from .compare import cmd_compare
from .eval import cmd_eval
from .explain import add_parser as add_explain_parser
from .export import cmd_export
from .generate import cmd_generate
from .inspect import cmd_inspect
from .merge import cmd_merge
from .train import cmd_train

EXIT_ERROR = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, per_method: bool = False) -> None:
    """One flag per TrainConfig field, help from the field's docstring. Defaults are left out of
    the namespace (SUPPRESS) so that only flags actually given override the config file.
    `per_method`: --method-arg also takes METHOD:KEY=VALUE (lorakit compare)."""
    docs = config_mod.field_docs(TrainConfig)
    kinds = config_mod.field_types()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        help_text = docs.get(f.name, "")
        default = getattr(defaults, f.name)
        if f.name in config_mod.CHOICES:
            help_text += f" Choices: {', '.join(config_mod.CHOICES[f.name])}."
        if f.name == "method":
            help_text += f" Choices: {', '.join(config_mod.method_names())}."
        shown_default = "" if default is None else f" (default: {default})"  # a None default is explained in prose
        if kinds[f.name] is bool:
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text}{shown_default}",
            )
        elif f.name == "method_args":
            if per_method:
                from ..compare import PER_METHOD_FIELDS

                help_text += (
                    " METHOD:KEY=VALUE sets it for that method only (e.g. vera:r=512); KEY may also be one of "
                    f"{', '.join(PER_METHOD_FIELDS)} for that method."
                )
            parser.add_argument(
                "--method-arg",
                dest=f.name,
                action="append",
                metavar="[METHOD:]KEY=VALUE" if per_method else "KEY=VALUE",
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif kinds[f.name] is dict:  # --columns a=b,c=d (repeatable)
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action="append",
                metavar="ROLE=COLUMN",
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                metavar=f.name.upper(),
                default=argparse.SUPPRESS,
                help=f"{help_text}{shown_default}",
            )


def _columns(text: str) -> dict[str, str]:
    from ..train.data import parse_columns

    try:
        return parse_columns(text)
    except LorakitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: 0 (greedy) or a finite positive number; -1 or nan is a mistake, not greedy."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or a finite positive number, got {text}")
    if 0 < value < MIN_TEMPERATURE:  # logits / 1e-300 overflow to inf: sampling fails deep inside transformers
        raise argparse.ArgumentTypeError(
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (below, sampling is greedy "
            f"in all but name and the scaled logits overflow), got {text}"
        )
    return value


MIN_TEMPERATURE = 1e-3


def seed(text: str) -> int:
    """An argparse type: a seed as `train --seed` takes it (an integer below 2^31 in size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if abs(value) >= 2**31:
        raise argparse.ArgumentTypeError(f"must be an integer from -2147483647 to 2147483647, got {short_repr(value)}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (`error: ...`, exit 2) like every other,
    naming the sub-command whose flags it is about and the closest flag or choice to a typo."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102 -- argparse's method
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            # an unknown flag of a sub-command: reported by that sub-command's parser, with its own flags
            commands = getattr(self, "commands", {})
            owner = commands.get(getattr(namespace, "command", None), self)
            flags = [s for action in owner._actions for s in action.option_strings]
            first = next((e for e in extras if e.startswith("-")), extras[0])
            owner.error(f"unrecognized arguments: {' '.join(extras)}{did_you_mean(first.split('=')[0], flags)}")
        return namespace

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 -- argparse's method
        self.given = list(sys.argv[1:] if args is None else args)  # a sub-command's parser gets its own arguments
        return super().parse_known_args(args, namespace)

    def unknown_flags(self) -> list[str]:
        """The flags given to this parser that it does not know (an abbreviation of a known one is known)."""
        flags = [s for action in self._actions for s in action.option_strings]
        given = [a.split("=")[0] for a in getattr(self, "given", []) if a.startswith("--") and a != "--"]
        return [g for g in given if not any(f.startswith(g) for f in flags)]

    def error(self, message: str):  # noqa: D102 -- argparse's hook
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(
                choice.group(1), re.findall(r"'([^']*)'", choice.group(2)) or choice.group(2).split(", ")
            )
        unknown = self.unknown_flags() if message.startswith("the following arguments are required") else []
        if unknown:  # `--adaptr x`: the typo is the mistake, not the missing --adapter
            flags = [s for action in self._actions for s in action.option_strings]
            message = f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(unknown[0], flags)}; {message}"
        elif message.startswith("the following arguments are required"):
            # a flag of its own that is one letter from the missing one (compare's --method for --methods)
            missing = re.findall(r"--[\w-]+", message)
            given = [a.split("=")[0] for a in getattr(self, "given", []) if a.startswith("--")]
            near = [(g, m) for g in given for m in missing if did_you_mean(g, [m])]
            if near:
                message += f" (did you mean {near[0][1]!r} for {near[0][0]!r}?)"
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command. With `command` (the one the command line names, "" for none),
    `train` and `compare` get their config flags only when they are that command: those flags list
    the registered methods, which imports torch, and `lorakit --help` starts without it."""
    everything = command is None
    parser = OneLineErrors(
        prog="lorakit", description="Fine-tune with the LoRA family; evaluate, generate, merge, export to GGUF."
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser(
        "train",
        help="fine-tune a model with an adapter (no arguments: the built-in demo job)",
        description="Fine-tune a model with an adapter. With no arguments, SmolLM2-135M learns the built-in "
        "reverse-words task on CPU in a few minutes. Flags override --config.",
    )
    train.add_argument("--config", metavar="YAML", help="YAML file of config fields (flags override it)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.add_argument(
        "--nproc",
        type=positive_int,
        metavar="N",
        help="train on N processes with torch.distributed (DDP, or FSDP2 with --distributed fsdp; gloo "
        "on CPU, NCCL on GPU): the same as "
        "`torchrun --nproc_per_node N -m lorakit train ...`. The global batch is --batch-size x N x "
        "--grad-accum",
    )
    if everything or command == "train":
        add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out metrics of a base model or base + adapter", formatter_class=fmt)
    ev.add_argument("--adapter", help="adapter directory or run directory (runs/<name>)")
    ev.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    ev.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    ev.add_argument("--data", help="evaluation data, read like train's --data (default: the run's held-out data)")
    ev.add_argument("--split", help="the split of a saved DatasetDict given as --data")
    ev.add_argument("--columns", type=_columns, help="map the data's columns: ROLE=COLUMN,... (as for train)")
    ev.add_argument("--metric", choices=config_mod.CHOICES["metric"], help="the headline metric (default: the run's)")
    ev.add_argument("--answer-pattern", help="exact match of extracted answers: gsm8k, last-number or a regex")
    ev.add_argument("--max-examples", type=int, help="evaluate at most this many examples (spread over the data)")
    ev.add_argument("--batch-size", type=positive_int, help="examples per batch (default: the run's)")
    ev.add_argument("--device", choices=config_mod.CHOICES["device"])
    ev.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar on stderr (only where stderr is a terminal)",
    )
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser(
        "compare",
        help="train several methods on the same data, steps and seed; table + HTML report",
        description="Train each method of --methods in its own process with the same settings (any train "
        "flag), then print a table and write compare.json, compare.csv and compare.html (plots need "
        "matplotlib: the plots extra). Running the same command again reuses finished methods and "
        "resumes an interrupted one.",
    )
    cmp.add_argument("--methods", required=True, help="comma-separated methods, e.g. lora,dora,vera,qlora")
    cmp.add_argument("--config", metavar="YAML", help="YAML file of train settings (flags override it)")
    cmp.add_argument("--no-html", action="store_true", help="skip the HTML report (no matplotlib needed)")
    if everything or command == "compare":
        add_config_flags(cmp, per_method=True)
    cmp.set_defaults(func=cmd_compare)

    ins = sub.add_parser(
        "inspect",
        help="what an adapter changed inside the model, module by module",
        formatter_class=fmt,
        description="Per adapted module: ||ΔW|| / ||W0|| (a layers x modules grid), the effective rank of "
        "ΔW, magnitude vs direction change (DoRA's view), and a warning for modules that did not change.",
    )
    ins.add_argument("adapter", help="adapter directory or run directory (runs/<name>)")
    ins.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    ins.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    ins.add_argument("--json", metavar="FILE", help="write every number (per module) as JSON")
    ins.add_argument(
        "--html", metavar="FILE", help="write the HTML report here (default: <run>/inspect.html for a run directory)"
    )
    ins.add_argument("--no-html", action="store_true", help="no HTML report (no matplotlib needed)")
    ins.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar on stderr (only where stderr is a terminal)",
    )
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --json or --html file")
    ins.set_defaults(func=cmd_inspect)

    add_explain_parser(sub)

    gen = sub.add_parser("generate", help="generate text with base + adapter, streamed", formatter_class=fmt)
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    gen.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]PATH",
        help="adapter or run directory; repeat to load several on one base (named NAME, or after the run)",
    )
    gen.add_argument("--use", metavar="NAME", help="the adapter for the prompt (default: the first; __base__ for none)")
    gen.add_argument(
        "--prompts",
        metavar="FILE",
        help='JSONL of {"prompt": ..., "adapter": NAME} (or a text file of plain lines): '
        "generated in one batch, each prompt through its own adapter; prints JSONL",
    )
    gen.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128)
    gen.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together with --prompts")
    gen.add_argument(
        "--temperature", type=temperature, default=0.0, help="0 = greedy; above 0 samples (a finite number)"
    )
    gen.add_argument("--seed", type=seed, default=0, help="the sampling's random seed (with --temperature above 0)")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="wrap the prompt in the tokenizer's chat template",
    )
    gen.set_defaults(func=cmd_generate)

    merge = sub.add_parser(
        "merge", help="write base + adapter as one plain Hugging Face model directory", formatter_class=fmt
    )
    merge.add_argument("--adapter", required=True, help="adapter directory or run directory (runs/<name>)")
    merge.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    merge.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out model directory (a directory of other files is never replaced)",
    )
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser(
        "export", help="write an adapter (or base + adapter merged) as a GGUF file for llama.cpp", formatter_class=fmt
    )
    export.add_argument("--adapter", required=True, help="adapter directory or run directory (runs/<name>)")
    export.add_argument("--format", choices=["gguf"], default="gguf", help="file format (llama.cpp's)")
    export.add_argument(
        "--merged",
        action="store_true",
        help="write the whole model with the adapter merged (DoRA, Delta-LoRA; or one file to ship)",
    )
    export.add_argument(
        "--outtype",
        choices=["f32", "f16", "q8_0"],
        help="tensor type: adapter f32 (default) or f16; merged f16 (default), f32 or q8_0",
    )
    export.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    export.add_argument("--out", help="output file (default: runs/<name>/adapter.gguf or merged-<outtype>.gguf)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.set_defaults(func=cmd_export)
    parser.commands = dict(sub.choices)
    return parser
