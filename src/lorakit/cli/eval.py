"""`lorakit eval`: the held-out metrics of a base model, or of a base with a saved adapter."""

from __future__ import annotations

import argparse

from ..train import config as config_mod
from .adapters import adapter_dir_and_config, chosen_task, load_adapted, trained_labels


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train.loading import fit_max_length, load_tokenizer, num_outputs, pick_device, use_bf16
    from ..train.report import format_metrics
    from ..train.run_data import build_datasets, describe_eval, measure

    adapter, cfg = adapter_dir_and_config(args.adapter)
    chosen_task(args.task, cfg, adapter)  # a warning where --task is not the run's
    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "task": args.task,
            "data": args.data,
            "eval_data": args.data,
            "split": args.split,
            "eval_split": args.split,
            "columns": args.columns,
            "metric": args.metric,
            "answer_pattern": args.answer_pattern,
            "max_eval_examples": args.max_examples,
            "device": args.device,
        }.items()
        if v is not None
    }
    if args.data is not None:
        overrides["eval_fraction"] = 0.0
        # --data is the data to score: the training data's settings do not apply to it
        overrides.setdefault("columns", {})
        overrides.setdefault("split", None)
        overrides.setdefault("eval_split", None)
    cfg = config_mod.from_dict(overrides, cfg)
    config_mod.validate(cfg)
    cfg, _ = fit_max_length(cfg)  # the run's length, or the default: cut to the model's positions without a note
    # a classifier keeps the label order it was trained with; unknown labels are an error
    labels = trained_labels(adapter)
    datasets = build_datasets(cfg, load_tokenizer(cfg.model, cfg.task), labels or None, encode_train=False)
    examples = datasets.eval  # with --data: the whole file (it is also the "eval data")
    model, tokenizer = load_adapted(cfg.model, adapter, cfg.task, num_outputs(cfg.task, datasets.labels))
    device = pick_device(cfg.device)
    model.to(device)
    result = measure(
        datasets,
        model,
        tokenizer,
        examples,
        device,
        use_bf16(cfg.precision, device),
        args.batch_size or cfg.eval_batch_size or cfg.batch_size,
        args.progress,
    )
    print(f"{describe_eval(datasets)}: {format_metrics(result)}")
    return 0
