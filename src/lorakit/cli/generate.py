"""`lorakit generate`: text from a base with saved adapters, streamed; a file of prompts, each through
its own adapter, in batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LorakitError
from .adapters import adapter_dir_and_config, load_adapted, named_adapters


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from ..inject import BASE_NAME, per_sample_adapters
    from ..train.data import has_chat_template, render_chat, text_ids

    adapters = named_adapters(args.adapter or [])
    first = next(iter(adapters.values()), None)
    _, cfg = adapter_dir_and_config(str(first) if first is not None else None)
    model_spec = args.model if args.model is not None else cfg.model
    jobs = prompt_jobs(args, list(adapters))
    model, tokenizer = load_adapted(model_spec, None, "causal-lm", extra=adapters)

    def encode(prompt: str) -> list[int]:  # the ids training gives the same prompt (`text_ids`)
        if args.chat and has_chat_template(tokenizer):
            return text_ids(tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}], True))
        return text_ids(tokenizer, prompt)

    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    if args.prompts is None:  # one prompt: streamed
        (name, prompt), = jobs
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad(), per_sample_adapters(model, [name]) if adapters else _nothing():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                           streamer=streamer, pad_token_id=pad_id, **sampling)
        return 0
    # several prompts, each with its own adapter: left-padded batches of --batch-size
    import json

    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        encoded = [encode(prompt) for _, prompt in chunk]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad(), per_sample_adapters(model, [name for name, _ in chunk]) if adapters else _nothing():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=pad_id, **sampling)
        for (name, prompt), row in zip(chunk, out[:, width:]):
            completion = tokenizer.decode(row, skip_special_tokens=True)
            print(json.dumps({"adapter": name if adapters else BASE_NAME, "prompt": prompt, "completion": completion}), flush=True)
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def prompt_jobs(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str]]:
    """(adapter name, prompt) for each prompt: the positional prompt (or stdin) with `--use`, or
    each line of `--prompts` (a JSONL file of {"prompt": ..., "adapter": ...}, or plain lines)."""
    import json

    from ..inject import BASE_NAME

    known = names + [BASE_NAME]
    default = names[0] if names else BASE_NAME

    def check(name: str, where: str) -> str:
        if name not in known:
            raise LorakitError(f"{where}: no adapter named {name!r}; loaded: {', '.join(known)}")
        return name

    if args.prompts is None:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        return [(check(args.use or default, "--use"), prompt)]
    if args.prompt is not None or args.use is not None:
        raise LorakitError("--prompts takes the prompts (and their adapters) from the file: drop the positional prompt and --use")
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read --prompts {path}: {err}") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LorakitError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record.get("prompt"), str):
                raise LorakitError(f"{path}:{number}: needs a string \"prompt\" (and optionally \"adapter\")")
            adapter = record.get("adapter", default)
            if not isinstance(adapter, str):
                raise LorakitError(f"{path}:{number}: \"adapter\" must be a name, got {adapter!r}")
            jobs.append((check(adapter, f"{path}:{number}"), record["prompt"]))
        else:
            jobs.append((default, line))
    if not jobs:
        raise LorakitError(f"{path}: no prompts")
    return jobs
