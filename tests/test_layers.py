"""lorakit's layers, checked: no module imports one of a layer above its own.

The table below is the layering docs/ARCHITECTURE.md describes, bottom first. A module may import
modules of its own layer and of the layers below it; each module is in the layer of the longest
name in the table that it starts with, and a module that none names fails the test (place a new
module when you add it). Every import counts: at the top of a file, inside a function (the lazy
ones), under `if TYPE_CHECKING:`. The check reads the source with `ast` and imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lorakit

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("lorakit.errors",)),
    (
        "foundation",
        (
            "lorakit.base_layers",
            "lorakit.targets",
            "lorakit.adapted_layer",
            "lorakit.gguf_reader",
            "lorakit.models",
            "lorakit.losses",
            "lorakit.kernels",
            "lorakit.files",
            "lorakit.children",
        ),
    ),
    ("methods", ("lorakit.methods",)),
    ("quantization", ("lorakit.quant",)),
    ("adapter sets", ("lorakit.inject", "lorakit.hooks", "lorakit.optim", "lorakit.param_summary")),
    ("adapter files", ("lorakit.io",)),
    ("training", ("lorakit.train",)),
    (
        "reports and export",
        (
            "lorakit.compare",
            "lorakit.compare_table",
            "lorakit.analysis",
            "lorakit.html_report",
            "lorakit.explain",
            "lorakit.gguf_export",
        ),
    ),
    ("interfaces", ("lorakit.cli", "lorakit.__main__", "lorakit.integrations", "lorakit")),
]

# Said once more for the methods, whatever the table's order becomes: what a method needs from the
# model at training time reaches it as hook arguments or from the foundation, never from these.
METHODS_NEVER_IMPORT = ("lorakit.inject", "lorakit.io", "lorakit.quant", "lorakit.train")

PACKAGE = Path(lorakit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ("lorakit",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest table name that `module` is or lies under (`lorakit` itself
    names the package's `__init__` only)."""
    best, best_length = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            inside = module.startswith(name + ".") and name != "lorakit"
            if (module == name or inside) and len(name) > best_length:
                best, best_length = index, len(name)
    return best


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, lorakit module) of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import inject` imports the module lorakit.inject
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in MODULES else base))
    return [(line, name) for line, name in found if name == "lorakit" or name.startswith("lorakit.")]


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_names_a_module(module):
    """A relative import that climbs too few or too many levels fails here, not at run time."""
    assert [(line, name) for line, name in imported_modules(module, MODULES[module]) if name not in MODULES] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downwards(module):
    own = layer_of(module)
    upward = [
        f"line {line}: {name} ({LAYERS[layer_of(name)][0]})"
        for line, name in imported_modules(module, MODULES[module])
        if layer_of(name) is not None and layer_of(name) > own
    ]
    assert upward == [], f"{module} ({LAYERS[own][0]}) imports from a layer above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("lorakit.methods")))
def test_methods_import_no_machinery(module):
    imports = imported_modules(module, MODULES[module])
    assert [
        (line, name)
        for line, name in imports
        if any(name == banned or name.startswith(banned + ".") for banned in METHODS_NEVER_IMPORT)
    ] == []


def test_the_table_catches_an_upward_import(tmp_path):
    """The check itself can fail: a foundation module importing the methods is reported."""
    bad = tmp_path / "base_layers.py"
    bad.write_text("from .methods import LoRA\n\ndef f():\n    from . import inject\n")
    names = [name for _, name in imported_modules("lorakit.base_layers", bad)]
    assert names == ["lorakit.methods", "lorakit.inject"]
    assert all(layer_of(name) > layer_of("lorakit.base_layers") for name in names)
