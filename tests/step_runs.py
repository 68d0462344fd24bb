"""One optimizer step's loss and gradients as `lorakit train` computes them (`set_up`, then
`accumulate_gradients` and the strategy's gradient reduction), for several `lorakit train` argument
lists: in this process (`step_results`), or in one torchrun launch the tests start:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/step_runs.py RUNS.json OUT.pt

RUNS.json holds {name: argument list}; the main process saves {name: (loss, {parameter: gradient})}.
"""

from __future__ import annotations

import json
import sys

import torch

from lorakit import inject
from lorakit.cli import build_parser, resolve_train_config
from lorakit.train import loop
from lorakit.train.distributed import SingleProcess, running, strategy_for


def step_results(argv: list[str], strategy: SingleProcess | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """(the logged loss of step 1, every adapter gradient before the optimizer step)."""
    strategy = strategy or SingleProcess()
    cfg = resolve_train_config(build_parser().parse_args(["train", *argv]))
    run = loop.set_up(cfg, lambda *_: None, strategy)
    run.model.train()
    loss, _, _ = loop.accumulate_gradients(run, 1)
    trainable = dict(inject.adapter_parameters(run.model))
    strategy.reduce_gradients(list(trainable.values()))
    return loss, {name: p.grad.detach().clone() for name, p in trainable.items()}


def main(runs_path: str, out_path: str) -> None:
    runs = json.loads(open(runs_path).read())
    with running(strategy_for("ddp")) as strategy:
        results = {name: step_results(argv, strategy) for name, argv in runs.items()}
        if strategy.is_main:
            torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
