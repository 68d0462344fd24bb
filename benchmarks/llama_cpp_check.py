"""lorakit against llama.cpp running what `lorakit export --format gguf` wrote.

On the built-in model (SmolLM2-135M-Instruct, its Q4_1 GGUF file as the base in both): the default
job's LoRA adapter exported as a GGUF adapter and run by llama.cpp (through llama-cpp-python) next to
lorakit's own adapted model, and a DoRA run exported merged. Measured:

- held-out exact match of the reverse-words task, greedy, the same prompts and token ids in both;
- next-token logits on fixed prompts: how far llama.cpp's are from lorakit's (llama.cpp multiplies
  Q4_1 weights with activations rounded to 8 bits, lorakit with the dequantized weights in fp32), and
  the correlation of the adapter's effect (adapted minus base logits) between the two;
- for the merged DoRA model: whether the greedy answers are the same.

    python benchmarks/llama_cpp_check.py                      # trains the default job (100 steps) and DoRA
    python benchmarks/llama_cpp_check.py --steps 30 --examples 20 --out-dir /tmp/check

Needs `pip install llama-cpp-python` (it builds llama.cpp; `LORAKIT_LLAMA_CPP=1 ./install.sh`). The
test suite (tests/test_llama_cpp.py) runs the same functions at a smaller budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [  # fixed prompts for the logit comparison: the task, and ordinary text
    "Reverse the order of the words: apple river stone\nAnswer:",
    "Reverse the order of the words: tiger lamp honey ocean\nAnswer:",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]


def lorakit_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lorakit", *args], check=True)


def train(out_dir: Path, name: str, steps: int, examples: int, method: str = "lora") -> Path:
    """A run of the built-in job (its adapter is what gets exported)."""
    run = out_dir / name
    if not (run / "adapter").is_dir():
        lorakit_cli(
            "train",
            "--method",
            method,
            "--steps",
            str(steps),
            "--max-eval-examples",
            str(examples),
            "--out-dir",
            str(out_dir),
            "--name",
            name,
            "--no-progress",
            "--overwrite",
        )
    return run


def llama(model_path: Path, lora_path: Path | None = None, n_ctx: int = 512):
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora_path)} if lora_path is not None else {}
    return Llama(model_path=str(model_path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, **kwargs)


def llama_logits(llm, token_ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `token_ids` (tokens x vocabulary)."""
    llm.reset()
    llm.eval(token_ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float64)


def llama_greedy(llm, token_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy continuation, stopped at end of sequence (as lorakit's evaluation generates)."""
    llm.reset()
    llm.eval(token_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos_id:
            break
        new.append(token)
        llm.eval([token])
    return new


def load_lorakit(adapter: Path | None):
    from lorakit.cli import load_adapted

    model, tokenizer = load_adapted(None, adapter, "causal-lm")
    return model, tokenizer


@torch.no_grad()
def lorakit_logits(model, token_ids: list[int]) -> np.ndarray:
    return model(torch.tensor([token_ids])).logits[0].double().numpy()


def logit_distance(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, float]:
    """How close llama.cpp's logits are to lorakit's, over every position of every prompt."""
    a, b = np.concatenate(ours), np.concatenate(theirs)
    return {
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_abs_logit_diff": float(np.abs(a - b).mean()),
        "logit_std": float(a.std()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def effect_correlation(
    ours: list[np.ndarray], theirs: list[np.ndarray], ours_base: list[np.ndarray], theirs_base: list[np.ndarray]
) -> dict[str, float]:
    """Correlation of the adapter's effect (adapted minus base logits) in lorakit and in llama.cpp."""
    effect_ours = np.concatenate(ours) - np.concatenate(ours_base)
    effect_theirs = np.concatenate(theirs) - np.concatenate(theirs_base)
    return {
        "adapter_effect_correlation": float(np.corrcoef(effect_ours.ravel(), effect_theirs.ravel())[0, 1]),
        "adapter_effect_std": float(effect_ours.std()),
    }


def exact_match_both(model, tokenizer, llm, examples: list[dict[str, str]]) -> dict[str, float]:
    """Held-out exact match, greedy, lorakit's generation and llama.cpp's on the same token ids."""
    from lorakit.train.evaluate import greedy_completions
    from lorakit.train.metrics import whole_completion_match

    prompts = [e["prompt"] for e in examples]
    answers = [e["completion"] for e in examples]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    ours = greedy_completions(model, tokenizer, prompts, longest + 2, 8, torch.device("cpu"), False)
    theirs = [
        tokenizer.decode(
            llama_greedy(llm, tokenizer(p)["input_ids"], longest + 2, tokenizer.eos_token_id), skip_special_tokens=True
        )
        for p in prompts
    ]
    hits_ours = [whole_completion_match(p, a) for p, a in zip(ours, answers)]
    hits_theirs = [whole_completion_match(p, a) for p, a in zip(theirs, answers)]
    return {
        "lorakit": float(np.mean(hits_ours)),
        "llama_cpp": float(np.mean(hits_theirs)),
        "same_answer": float(np.mean([o.strip() == t.strip() for o, t in zip(ours, theirs)])),
        "examples": len(examples),
    }


def greedy_answers_agree(model, tokenizer, llm, prompts: list[str], max_new_tokens: int = 12) -> list[tuple[str, str]]:
    """(lorakit's greedy answer, llama.cpp's) per prompt, decoded."""
    pairs = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ours = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        theirs = tokenizer.decode(
            llama_greedy(llm, ids, max_new_tokens, tokenizer.eos_token_id), skip_special_tokens=True
        )
        pairs.append((ours, theirs))
    return pairs


def check(out_dir: Path, steps: int, examples: int, dora_steps: int, runs: dict[str, Path] | None = None) -> dict:
    from lorakit.models import smollm2_gguf
    from lorakit.train import tasks

    base_file = smollm2_gguf()
    results: dict = {"base": base_file.name}
    runs = runs or {}
    run = runs.get("lora") or train(out_dir, "lora", steps, examples)
    lorakit_cli("export", "--adapter", str(run), "--format", "gguf", "--overwrite")
    adapter_gguf = run / "adapter.gguf"
    model, tokenizer = load_lorakit(run / "adapter")
    base_llm, adapted_llm = llama(base_file), llama(base_file, adapter_gguf)
    held_out = tasks.generate()[1][:examples]
    t = time.time()
    results["exact_match"] = exact_match_both(model, tokenizer, adapted_llm, held_out)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = [lorakit_logits(model, i) for i in ids]
    from lorakit import inject

    with inject.disabled(model):
        ours_base = [lorakit_logits(model, i) for i in ids]
    theirs = [llama_logits(adapted_llm, i) for i in ids]
    theirs_base = [llama_logits(base_llm, i) for i in ids]
    results["adapted_logits"] = logit_distance(ours, theirs) | effect_correlation(ours, theirs, ours_base, theirs_base)
    results["base_logits"] = logit_distance(ours_base, theirs_base)
    base_llm.close(), adapted_llm.close()  # before interpreter exit, where llama-cpp-python's own close fails
    results["runs"] = {"lora": str(run)}
    if dora_steps:
        dora = runs.get("dora") or train(out_dir, "dora", dora_steps, 8, method="dora")  # its own eval is not used
        merged = dora / "merged-f16.gguf"
        lorakit_cli("export", "--adapter", str(dora), "--merged", "--format", "gguf", "--overwrite")
        model, tokenizer = load_lorakit(dora / "adapter")
        merged_llm = llama(merged)
        pairs = greedy_answers_agree(model, tokenizer, merged_llm, [e["prompt"] for e in held_out[:10]] + PROMPTS[2:])
        merged_llm.close()
        results["runs"]["dora"] = str(dora)
        results["dora_merged"] = {
            "same_greedy_answers": sum(o == t for o, t in pairs),
            "prompts": len(pairs),
            "pairs": pairs,
        }
    results["check_seconds"] = round(time.time() - t, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of the LoRA run (the default job's)")
    parser.add_argument("--dora-steps", type=int, default=50, help="training steps of the DoRA run (0: skip)")
    parser.add_argument("--examples", type=int, default=100, help="held-out examples for exact match")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/llama-cpp-check"))
    parser.add_argument(
        "--lora-run", type=Path, help="use this finished LoRA run of the built-in job instead of training"
    )
    parser.add_argument("--dora-run", type=Path, help="use this finished DoRA run instead of training")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "gguf-llama-cpp.json")
    args = parser.parse_args()
    runs = {k: v for k, v in (("lora", args.lora_run), ("dora", args.dora_run)) if v is not None}
    results = check(args.out_dir, args.steps, args.examples, args.dora_steps, runs)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in results.items() if k != "dora_merged"}
            | {"dora_merged": {k: v for k, v in results.get("dora_merged", {}).items() if k != "pairs"}},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
