"""MkDocs hooks: the parts of the site that are made from the code and the results, never typed.

- `<!-- generated at build: cli -->`: the command-line reference, from lorakit's own argparse parser
  (`lorakit.cli.parser.build_parser`), so every flag and its help text are this version's.
- `<!-- generated at build: api -->`: the Python API reference of every top-level name
  (`lorakit._PUBLIC`, the one public list), rendered from docstrings by mkdocstrings.
- `<!-- generated at build: modules -->`: the main modules, without the names the API page has.
- `<!-- generated: NAME -->` blocks: benchmark tables, made again from benchmarks/results/*.json by
  benchmarks/tables.py. A page whose copy of a table differs is a warning, so `mkdocs build --strict`
  fails until `python benchmarks/tables.py` rewrites it: the text and the numbers cannot disagree.

The hooks import lorakit from this checkout's src/ (not an installed copy elsewhere).
"""

from __future__ import annotations

import argparse
import html
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# MkDocs restores sys.path after loading a hook: what must come from this checkout is imported now, and
# stays in sys.modules (lorakit's submodules then resolve inside this checkout's package)
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import lorakit  # noqa: E402
import tables  # noqa: E402  (benchmarks/ is not a package)

if Path(lorakit.__file__).resolve().parents[2] != ROOT:
    raise ImportError(f"the docs hooks need this checkout's lorakit ({ROOT / 'src'}), got {lorakit.__file__}")

log = logging.getLogger("mkdocs.hooks.lorakit")  # under "mkdocs": --strict counts its warnings

CLI, API, MODULES = (f"<!-- generated at build: {name} -->" for name in ("cli", "api", "modules"))

# Titles of the public names' modules on the API page (a module not listed here gets its own name)
API_SECTIONS = {
    "methods": "Methods",
    "inject": "Adapters on a model",
    "optim": "LoRA+ parameter groups",
    "hooks": "Training hooks",
    "io": "Adapter files",
    "gguf_export": "GGUF export",
    "quant": "4-bit base (QLoRA)",
    "param_summary": "Summaries",
}
# The modules page: what a user reaches through a module rather than the top level
MODULE_PAGES = [
    "lorakit.inject",
    "lorakit.io",
    "lorakit.hooks",
    "lorakit.quant",
    "lorakit.integrations",
    "lorakit.explain",
    "lorakit.models",
    "lorakit.train.config",
    "lorakit.train.allocator",
    "lorakit.methods.base",
    "lorakit.errors",
]


def on_pre_build(config) -> None:
    """The README is no page of the site, but the home page includes parts of it: its tables too."""
    for name in tables.stale_blocks((ROOT / "README.md").read_text()):
        log.warning(f"README.md: the table '{name}' differs from benchmarks/results; run `python benchmarks/tables.py`")


def on_page_markdown(markdown: str, page, config, files) -> str:
    try:
        for name in tables.stale_blocks(markdown):
            log.warning(
                f"{page.file.src_uri}: the table '{name}' differs from benchmarks/results; "
                "run `python benchmarks/tables.py` to write it again"
            )
        markdown = tables.fill(markdown)
    except (tables.UnknownTable, FileNotFoundError) as err:
        log.warning(f"{page.file.src_uri}: {err}")
    if CLI in markdown:
        markdown = markdown.replace(CLI, cli_reference())
    if API in markdown:
        markdown = markdown.replace(API, api_reference())
    if MODULES in markdown:
        markdown = markdown.replace(MODULES, modules_reference())
    return markdown


# --- the command line ------------------------------------------------------------------------------


def cli_reference() -> str:
    from lorakit.cli.parser import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summary = {a.dest: a.help for a in commands._choices_actions}
    parts = [
        table(
            ["command", "what it does"],
            [[f"[`lorakit {name}`](#lorakit-{name})", cell(summary[name])] for name in commands.choices],
        )
    ]
    for name, sub in commands.choices.items():
        parts.append(f"## `lorakit {name}` {{#lorakit-{name}}}\n\n{cell(sub.description or summary[name])}")
        formatter = sub._get_formatter()
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if action.choices and "Choices:" not in text and not isinstance(action, argparse._SubParsersAction):
                text += f" Choices: {', '.join(map(str, action.choices))}."
            if action.required:
                text = "Required. " + text
            rows.append([f"`{formatter._format_action_invocation(action)}`", cell(text)])
        parts.append(table(["flag", "what it does"], rows))
    return "\n\n".join(parts)


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    )


def cell(text: str) -> str:
    """Help text as one markdown table cell: its `code` spans kept (a `|` inside one does not end the
    cell), everything else shown literally."""
    pieces = re.split(r"(`[^`]*`)", " ".join(text.split()))
    out = []
    for piece in pieces:
        if piece.startswith("`"):
            out.append(piece)
        else:
            out.append(re.sub(r"([\\*_\[\]|#])", r"\\\1", html.escape(piece, quote=False)))
    return "".join(out)


# --- the Python API --------------------------------------------------------------------------------


def public_names() -> dict[str, str]:
    import lorakit

    return dict(lorakit._PUBLIC)


def api_reference() -> str:
    by_module: dict[str, list[str]] = {}
    for name, module in public_names().items():
        by_module.setdefault(module, []).append(name)
    parts = []
    for module, names in by_module.items():
        parts.append(f"## {API_SECTIONS.get(module, f'`lorakit.{module}`')}")
        for name in names:
            # method configs: their docstring's Attributes are the settings; their methods are the machinery's
            members = "\n    options:\n      members: false" if module == "methods" else ""
            parts.append(f"::: lorakit.{module}.{name}{members}")
    return "\n\n".join(parts)


def modules_reference() -> str:
    top_level = public_names()
    parts = []
    for path in MODULE_PAGES:
        module = path.removeprefix("lorakit.")
        shown_on_api_page = [name for name, where in top_level.items() if where == module]
        filters = ["!^_", *(f"!^{name}$" for name in shown_on_api_page)]
        parts.append(
            f"::: {path}\n    options:\n      heading_level: 2\n      show_root_full_path: true\n"
            f"      filters: {filters!r}"
        )
    return "\n\n".join(parts)
