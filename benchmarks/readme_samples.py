"""Regenerate the sample outputs in README.md by running the commands they show: a sample is never
typed, so it always says what the command prints.

    OMP_NUM_THREADS=1 python benchmarks/readme_samples.py               # every sample (minutes)
    OMP_NUM_THREADS=1 python benchmarks/readme_samples.py --only sst2   # the samples of one group
    python benchmarks/readme_samples.py --list                          # the samples and their commands

A sample in README.md is the fenced block between `<!-- sample: NAME -->` and `<!-- /sample -->`.
`SAMPLES` says which command makes it (run in a scratch directory, data from ../shared/datasets) and
which of its lines the README shows. Samples of one group run in order (`sst2-inspect` reads the run
`sst2-train` wrote), so a README section and the samples under it always come from one run.
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


def inspect_summary(lines: list[str]) -> list[str]:
    """The summary of `lorakit inspect`: its grid cut to the first and last layer (`...` between),
    then the lines on rank and on magnitude against direction."""
    start = next(i for i, line in enumerate(lines) if line.startswith("relative change"))
    grid = [line for line in lines[start + 2:] if re.match(r"\s+\d+\s", line)]
    below = lines[start + 2 + len(grid):]
    kept = [lines[start], lines[start + 1], grid[0], "  ...", grid[-1]] if len(grid) > 2 else [lines[start], lines[start + 1], *grid]
    return kept + [line for line in below if line.startswith(("bert.", "effective rank", "magnitude vs direction"))]


SAMPLES = [
    Sample("sst2-train", "sst2",
           ["train", "--task", "classify", "--data", "{data}/sst2/train.tsv", "--eval-data", "{data}/sst2/dev.tsv",
            "--steps", "150", "--batch-size", "16", "--max-eval-examples", "1000", "--out-dir", "{runs}", "--name", "sst2",
            "--no-progress"],
           starting_with("data columns", "after:", "accuracy (held-out)")),  # no timings: they follow the machine's load
    Sample("sst2-inspect", "sst2", ["inspect", "{runs}/sst2", "--no-html", "--no-progress"], inspect_summary),
]


def run(sample: Sample, runs: Path) -> list[str]:
    argv = [part.format(data=DATASETS, runs=runs) for part in sample.command]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, env=env, cwd=runs)
    if done.returncode != 0:
        raise SystemExit(f"{sample.name}: lorakit {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return sample.keep((done.stderr + done.stdout).splitlines())  # the messages as they came, then the summary


def replace_sample(text: str, name: str, lines: list[str]) -> str:
    """README text with the fenced block of sample `name` replaced by `lines`."""
    pattern = re.compile(rf"(<!-- sample: {re.escape(name)} -->\n```[^\n]*\n)(.*?)(```\n<!-- /sample -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no sample {name!r} (<!-- sample: {name} --> ... <!-- /sample -->)")
    return pattern.sub(lambda m: m.group(1) + "".join(line + "\n" for line in lines) + m.group(3), text, count=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="GROUP", help=f"one group: {', '.join(sorted({s.group for s in SAMPLES}))}")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--list", action="store_true", help="print the samples and their commands, run nothing")
    args = parser.parse_args()
    chosen = [s for s in SAMPLES if args.only in (None, s.group)]
    if args.list or not chosen:
        for s in SAMPLES:
            print(f"{s.name} ({s.group}): lorakit {' '.join(s.command)}")
        return 0 if chosen else 2
    text = args.readme.read_text()
    with tempfile.TemporaryDirectory(prefix="lorakit-samples-") as scratch:
        for sample in chosen:
            print(f"running {sample.name} ...", file=sys.stderr, flush=True)
            lines = run(sample, Path(scratch))
            text = replace_sample(text, sample.name, lines)
            print("\n".join(lines), file=sys.stderr)
    args.readme.write_text(text)
    print(f"{args.readme}: {len(chosen)} sample(s) regenerated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
