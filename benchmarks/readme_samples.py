"""Regenerate the sample outputs in the project's Markdown files (README.md, docs/*.md) by running the
commands they show: a sample is never typed, so it always says what the command prints.

    OMP_NUM_THREADS=1 python benchmarks/readme_samples.py                # every sample (minutes)
    OMP_NUM_THREADS=1 python benchmarks/readme_samples.py --only sst2    # the samples of one group
    OMP_NUM_THREADS=1 python benchmarks/readme_samples.py docs/data.md   # the samples of the files given
    python benchmarks/readme_samples.py --list                           # the samples, their commands and places

A sample is the fenced block between `<!-- sample: NAME -->` and `<!-- /sample -->`, each on a line of its
own (a marker quoted inside a line is text), in any of the Markdown files (default: README.md and
docs/*.md; a sample may sit in several, each copy is regenerated). `SAMPLES` says which command makes it (run in a scratch directory, data from
../shared/datasets) and which of its lines the page shows. Samples of one group run in order
(`sst2-inspect` reads the run `sst2-train` wrote), so a section and the samples under it always come
from one run. Every block is checked before anything runs: a marker naming no known sample, or a
sample with no block, stops the script.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass
class Sample:
    name: str
    group: str
    command: list[str]  # lorakit's arguments; {data} and {runs} are filled in
    keep: Callable[[list[str]], list[str]]  # the lines of the output the README shows


def starting_with(*prefixes: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [line for line in lines if line.startswith(prefixes)]


def without_timings(keep: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
    """`keep`, with the seconds a line reports (` (36 s)`) left out: they follow the machine's load, and a
    sample regenerated on the same code should not change."""
    return lambda lines: [re.sub(r" \(\d+(\.\d+)? s\)", "", line) for line in keep(lines)]


def inspect_summary(lines: list[str]) -> list[str]:
    """The summary of `lorakit inspect`: its grid, then the lines on the largest changes (the first two),
    rank and magnitude against direction."""
    start = next(i for i, line in enumerate(lines) if line.startswith("relative change"))
    grid = [line for line in lines[start + 2 :] if re.match(r"\s+\d+\s", line)]
    below = lines[start + 2 + len(grid) :]
    kept = [
        line
        for line in below
        if line.startswith(("bert.", "largest changes", "effective rank", "magnitude vs direction"))
    ]
    # the largest changes: the first two of five (the grid above shows them all)
    kept = [
        ", ".join(line.split(", ")[:2]) + ", ..."
        if line.startswith("largest changes") and line.count(", ") > 1
        else line
        for line in kept
    ]
    return [lines[start], lines[start + 1], *grid] + kept


def run_summary(lines: list[str]) -> list[str]:
    """The summary `lorakit train` ends with, from its `method` line to its last metric line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    end = max(i for i, line in enumerate(lines) if line.startswith(("eval loss", "final train loss")))
    return lines[start : end + 1]


SAMPLES = [
    Sample(
        "default-train", "default", ["train", "--out-dir", "{runs}", "--name", "default", "--no-progress"], run_summary
    ),
    Sample(
        "sst2-train",
        "sst2",
        [
            "train",
            "--task",
            "classify",
            "--data",
            "{data}/sst2/train.tsv",
            "--eval-data",
            "{data}/sst2/dev.tsv",
            "--steps",
            "150",
            "--batch-size",
            "16",
            "--max-eval-examples",
            "1000",
            "--out-dir",
            "{runs}",
            "--name",
            "sst2",
            "--no-progress",
        ],
        without_timings(
            starting_with(
                "data columns",
                "before:",
                "after:",
                "method ",
                "trainable params",
                "adapter size on disk",
                "accuracy (held-out)",
            )
        ),
    ),
    Sample("sst2-inspect", "sst2", ["inspect", "{runs}/sst2", "--no-html", "--no-progress"], inspect_summary),
]
# blocks whose output another script's run makes (benchmarks/reproduce.py's comparison, hours of CPU):
# left as written here, and listed by --list
ELSEWHERE = {
    "sst2-lora-drop-inspect": "lorakit inspect on the lora-drop run of benchmarks/reproduce.py's SST-2 comparison"
}


def run(sample: Sample, runs: Path) -> list[str]:
    argv = [part.format(data=DATASETS, runs=runs) for part in sample.command]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, env=env, cwd=runs)
    if done.returncode != 0:
        raise SystemExit(f"{sample.name}: lorakit {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return sample.keep((done.stderr + done.stdout).splitlines())  # the messages as they came, then the summary


_BLOCK = r"(^[ \t]*<!--[ \t]*sample:[ \t]*{name}[ \t]*-->[ \t]*\r?\n[ \t]*(?P<fence>```|~~~)[^\n]*\n)(.*?)(^[ \t]*(?P=fence)[ \t]*\r?\n[ \t]*<!--[ \t]*/sample[ \t]*-->)"


def sample_names(text: str) -> list[str]:
    """The names of the sample markers in a Markdown text, in order."""
    return re.findall(
        r"^[ \t]*<!--[ \t]*sample:[ \t]*(\S+?)[ \t]*-->", text, re.M
    )  # on a line of its own: not `quoted`


def replace_sample(text: str, name: str, lines: list[str], where: str = "README.md") -> str:
    """Markdown `text` with every fenced block of sample `name` replaced by `lines`."""
    pattern = re.compile(_BLOCK.format(name=re.escape(name)), re.S | re.M)
    if not pattern.search(text):
        raise SystemExit(f"{where} has no sample {name!r} (<!-- sample: {name} -->, a fenced block, <!-- /sample -->)")
    return pattern.sub(lambda m: m.group(1) + "".join(line + "\n" for line in lines) + m.group(4), text)


def default_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def places(pages: list[Path], chosen: list[Sample]) -> dict[str, list[Path]]:
    """Which of `pages` hold each chosen sample; a marker of no known sample, a marker without its
    fenced block, or a chosen sample in none of the pages stops the script (before anything runs)."""
    known = {s.name for s in SAMPLES}
    found: dict[str, list[Path]] = {s.name: [] for s in chosen}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for name in sample_names(text):
            if name in ELSEWHERE:
                continue
            if name not in known:
                close = [k for k in known if k.split("-")[0] == name.split("-")[0]]
                raise SystemExit(f"{page}: no sample is named {name!r} (known: {', '.join(sorted(close or known))})")
            if not re.search(_BLOCK.format(name=re.escape(name)), text, re.S | re.M):
                raise SystemExit(f"{page}: the sample {name!r} is not a fenced block closed by <!-- /sample -->")
            if name in found and page not in found[name]:
                found[name].append(page)
    missing = [name for name, where in found.items() if not where]
    if missing:
        raise SystemExit(f"no block for sample(s) {', '.join(missing)} in {', '.join(str(p) for p in pages)}")
    return found


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.samples-tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pages", nargs="*", type=Path, help="Markdown files holding samples (default: README.md, docs/*.md)"
    )
    parser.add_argument("--only", metavar="GROUP", help=f"one group: {', '.join(sorted({s.group for s in SAMPLES}))}")
    parser.add_argument("--list", action="store_true", help="print the samples, their commands and pages; run nothing")
    args = parser.parse_args(argv)
    pages = args.pages or default_pages()
    for page in pages:
        if not page.is_file():
            raise SystemExit(f"{page}: no such file")
    named = {name for page in pages for name in sample_names(page.read_text(encoding="utf-8"))}
    # the samples of the pages given, with the samples of their groups that must run first
    groups = {s.group for s in SAMPLES if s.name in named} if args.pages else {s.group for s in SAMPLES}
    chosen = [s for s in SAMPLES if s.group in groups and args.only in (None, s.group)]
    if not chosen:
        raise SystemExit(
            f"no sample to run in {', '.join(map(str, pages))}"
            f"{f' of group {args.only}' if args.only else ''} (groups: {', '.join(sorted({s.group for s in SAMPLES}))})"
        )
    where = places(pages, [s for s in chosen if not args.pages or s.name in named])
    if args.list:
        for s in chosen:
            shown = ", ".join(map(str, where.get(s.name, []))) or "no page given: runs for its group"
            print(f"{s.name} ({s.group}, in {shown}): lorakit {' '.join(s.command)}")
        for name, made in ELSEWHERE.items():
            print(f"{name} (not run here): {made}")
        return 0
    texts = {page: page.read_text(encoding="utf-8") for page in pages}
    originals = dict(texts)
    with tempfile.TemporaryDirectory(prefix="lorakit-samples-") as scratch:
        for sample in chosen:
            print(f"running {sample.name} ...", file=sys.stderr, flush=True)
            lines = run(sample, Path(scratch))
            for page in where.get(sample.name, []):
                texts[page] = replace_sample(texts[page], sample.name, lines, str(page))
            print("\n".join(lines), file=sys.stderr)
    for page, text in texts.items():
        if text != originals[page]:  # only the pages whose samples changed (another page may be edited meanwhile)
            if page.read_text(encoding="utf-8") != originals[page]:
                raise SystemExit(f"{page} changed while the samples ran; nothing written to it (run again)")
            write_atomically(page, text)
            print(f"{page}: regenerated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
