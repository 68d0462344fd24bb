"""One optimizer step over sequences of different lengths: the same loss and gradients however its
examples are split into micro-batches and processes (b*k x 1, b x k, 1 x b*k, 2 processes x b x k/2).

The step's loss is the mean over all its label tokens (a sequence task's: over its examples), as
one big batch computes it; computed through `lorakit train`'s own set-up and step
(tests/step_runs.py), in this process and, for two processes, in one torchrun launch (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit.train import data as data_mod
from step_runs import step_results
from tiny_lm import save_tiny_bert, save_tiny_llama, write_jsonl

WORDS = "apple river stone cloud tiger green lamp piano honey fox dog movie".split()
STEP = 8  # examples in one optimizer step


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Completions from 1 to 12 words: micro-batches hold very different numbers of label tokens."""
    records = [
        {
            "prompt": f"Repeat: {WORDS[i % 12]}\nAnswer:",
            "completion": " " + " ".join([WORDS[(i * 5) % 12]] * (1 + (i * 7) % 12)),
        }
        for i in range(2 * STEP)
    ]
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "uneven.jsonl", records))


def flags(model, data, out_dir, name, batch_size, grad_accum, *extra) -> list[str]:
    return [
        "--model",
        model,
        "--data",
        data,
        "--eval-data",
        data,
        "--max-eval-examples",
        "1",
        "--out-dir",
        str(out_dir),
        "--name",
        name,
        "--steps",
        "1",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "0",
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        str(grad_accum),
        "--no-progress",
        *extra,
    ]


def assert_same_step(result, reference, what: str) -> None:
    loss, grads = result
    expected_loss, expected_grads = reference
    assert loss == pytest.approx(expected_loss, rel=1e-5), what
    assert grads.keys() == expected_grads.keys()
    assert any(g.abs().max() > 0 for g in expected_grads.values())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")


def whole_step_reference(model_dir, data, out_dir):
    """The loss of the step's 8 examples as one batch (sum over label tokens / their count), by hand."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli import build_parser, resolve_train_config
    from lorakit.train.loop import build_datasets, check_config, load_tokenizer

    cfg = check_config(
        resolve_train_config(build_parser().parse_args(["train", *flags(model_dir, data, out_dir, "ref", STEP, 1)]))
    )
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    examples = build_datasets(cfg, tokenizer).train
    batch = data_mod.collate(data_mod.micro_batch(examples, 0, STEP, cfg.seed), tokenizer.pad_token_id)
    logits = AutoModelForCausalLM.from_pretrained(model_dir)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=data_mod.IGNORE_INDEX,
        reduction="sum",
    )
    per_pair = [int((targets[i : i + 2] != data_mod.IGNORE_INDEX).sum()) for i in range(0, STEP, 2)]
    return float(losses) / int((targets != data_mod.IGNORE_INDEX).sum()), per_pair


def test_one_step_is_the_same_whatever_the_micro_batch_split(tiny_model, uneven_data, tmp_path):
    reference = step_results(flags(tiny_model, uneven_data, tmp_path, "whole", STEP, 1))
    by_hand, per_pair = whole_step_reference(tiny_model, uneven_data, tmp_path)
    assert len(set(per_pair)) > 1, per_pair  # the micro-batches of 2 differ in label tokens
    assert reference[0] == pytest.approx(by_hand, rel=1e-5)
    for batch_size, grad_accum in ((4, 2), (2, 4), (1, 8)):
        result = step_results(flags(tiny_model, uneven_data, tmp_path, f"b{batch_size}", batch_size, grad_accum))
        assert_same_step(result, reference, f"{batch_size} x {grad_accum}")


@pytest.mark.distributed
def test_two_processes_give_the_same_step_as_one(tiny_model, uneven_data, tmp_path):
    """2 processes x 2 x 2 and 2 processes x 4 x 1 (DDP over gloo) against 1 process x 8 x 1."""
    reference = step_results(flags(tiny_model, uneven_data, tmp_path, "whole", STEP, 1))
    runs = {f"{b}x{k}": flags(tiny_model, uneven_data, tmp_path, f"two-{b}x{k}", b, k) for b, k in ((2, 2), (4, 1))}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    script = os.path.join(os.path.dirname(__file__), "step_runs.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script,
        str(tmp_path / "runs.json"),
        str(tmp_path / "out.pt"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in runs:
        assert_same_step(results[name], reference, f"2 processes x {name}")


def test_a_classifier_step_is_the_mean_over_its_examples_whatever_the_split(tmp_path):
    from transformers import BertConfig, BertModel

    model = str(save_tiny_bert(tmp_path / "bert"))
    config = BertConfig.from_pretrained(model)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # train mode, yet the same every time
    BertModel.from_pretrained(model, config=config).save_pretrained(model)
    rows = [{"text": " ".join(WORDS[: 1 + (i * 5) % 12]), "label": str(i % 2)} for i in range(2 * STEP)]
    data = str(write_jsonl(tmp_path / "labels.jsonl", rows))
    extra = ("--task", "classify")
    reference = step_results(flags(model, data, tmp_path, "whole", STEP, 1, *extra))
    for batch_size, grad_accum in ((2, 4), (1, 8)):
        result = step_results(flags(model, data, tmp_path, f"b{batch_size}", batch_size, grad_accum, *extra))
        assert_same_step(result, reference, f"classify {batch_size} x {grad_accum}")
