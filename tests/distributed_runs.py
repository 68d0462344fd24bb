"""Several `lorakit train` runs in one launch of N processes (the tests start it): one process group and
one import of torch and transformers for all of them, which keeps the multi-process tests short.

    python -m lorakit.train.launch 2 tests/distributed_runs.py RUNS.json

RUNS.json holds a list of `lorakit train` argument lists; each run shares this launch's strategy
(`--distributed` in the arguments chooses it, and every run of a launch must choose the same).
"""

from __future__ import annotations

import json
import sys

from lorakit.cli import build_parser, resolve_train_config
from lorakit.train import train
from lorakit.train.distributed import running, strategy_for


def main(path: str) -> None:
    runs = json.loads(open(path).read())
    configs = [resolve_train_config(build_parser().parse_args(["train", *argv])) for argv in runs]
    with running(strategy_for(configs[0].distributed)) as strategy:
        for cfg in configs:
            train(cfg, echo=lambda *_: None, strategy=strategy)


if __name__ == "__main__":
    main(sys.argv[1])
