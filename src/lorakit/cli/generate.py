"""`lorakit generate`: text from a base with saved adapters, streamed; a file of prompts, each through
its own adapter, in batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LorakitError, check_text, did_you_mean, short_repr
from .adapters import adapter_dir_and_config, load_adapted, named_adapters


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from ..inject import BASE_NAME, per_sample_adapters
    from ..models import max_positions
    from ..train.data import has_chat_template, render_chat, text_ids

    adapters = named_adapters(args.adapter or [])
    first = next(iter(adapters.values()), None)
    _, cfg = adapter_dir_and_config(str(first) if first is not None else None)
    model_spec = args.model if args.model is not None else cfg.model
    jobs = prompt_jobs(args, list(adapters))
    model, tokenizer = load_adapted(model_spec, None, "causal-lm", extra=adapters)

    limit = max_positions(model.config)

    def encode(
        prompt: str, where: str = "the prompt"
    ) -> list[int]:  # the ids training gives the same prompt (`text_ids`)
        if args.chat and has_chat_template(tokenizer):
            ids = text_ids(tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}], True))
        else:
            ids = text_ids(tokenizer, prompt)
        if not ids:  # an empty prompt: start from the beginning-of-text token, where the tokenizer has one
            if tokenizer.bos_token_id is None:
                raise LorakitError(f"{where} is empty and the tokenizer has no beginning-of-text token to start from")
            ids = [tokenizer.bos_token_id]
        if limit is not None and len(ids) >= limit:
            raise LorakitError(
                f"{where} is {len(ids)} tokens; the model reads at most {limit} positions, the completion included"
            )
        return ids

    def new_tokens(width: int) -> int:
        if limit is None or width + args.max_new_tokens <= limit:
            return args.max_new_tokens
        print(
            f"note: --max-new-tokens {args.max_new_tokens} runs past the {limit} positions the model reads: "
            f"at most {limit - width} new tokens after a {width}-token prompt",
            file=sys.stderr,
        )
        return limit - width

    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    if args.prompts is None:  # one prompt: streamed
        ((name, prompt),) = jobs
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad(), per_sample_adapters(model, [name]) if adapters else _nothing():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens(ids.shape[1]),
                streamer=streamer,
                pad_token_id=pad_id,
                **sampling,
            )
        return 0
    # several prompts, each with its own adapter: left-padded batches of --batch-size
    import json

    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        encoded = [encode(prompt, f"{args.prompts}: prompt {start + i + 1}") for i, (_, prompt) in enumerate(chunk)]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad(), per_sample_adapters(model, [name for name, _ in chunk]) if adapters else _nothing():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens(width), pad_token_id=pad_id, **sampling
            )
        for (name, prompt), row in zip(chunk, out[:, width:]):
            completion = tokenizer.decode(row, skip_special_tokens=True)
            print(
                json.dumps({"adapter": name if adapters else BASE_NAME, "prompt": prompt, "completion": completion}),
                flush=True,
            )
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


PROMPT_KEYS = ("prompt", "adapter")


def prompt_jobs(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str]]:
    """(adapter name, prompt) for each prompt: the positional prompt (or stdin) with `--use`, or
    each line of `--prompts`: JSON Lines of {"prompt": ..., "adapter": ...} (a .jsonl or .json file, or
    any file whose first line is a JSON object: then every line must be one), or else plain lines,
    one prompt each."""
    from ..inject import BASE_NAME

    known = names + [BASE_NAME]
    default = names[0] if names else BASE_NAME

    def check(name: str, where: str) -> str:
        if name not in known:
            raise LorakitError(
                f"{where}: no adapter named {name!r}; loaded: {', '.join(known)}{did_you_mean(name, known)}"
            )
        return name

    if args.prompts is None:
        try:
            prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        except UnicodeDecodeError:
            raise LorakitError("the prompt on stdin is not UTF-8 text") from None
        return [(check(args.use or default, "--use"), check_text(prompt, "the prompt"))]
    if args.prompt is not None or args.use is not None:
        raise LorakitError(
            "--prompts takes the prompts (and their adapters) from the file: drop the positional prompt and --use"
        )
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read --prompts {path}: {err}") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise LorakitError(f"{path}: no prompts")
    if path.suffix.lower() not in (".jsonl", ".json") and not _is_json_object(numbered[0][1]):
        return [(default, line) for _, line in numbered]  # plain text: a prompt a line (a prompt may start with "{")
    jobs = []
    for number, line in numbered:
        where = f"{path}:{number}"
        record = _json_object(line, where)
        unknown = sorted(set(record) - set(PROMPT_KEYS))
        if unknown:
            raise LorakitError(
                f'{where}: unknown key(s) {short_repr(unknown)}; a prompt line has "prompt" and '
                f'optionally "adapter"{did_you_mean(unknown[0], PROMPT_KEYS)}'
            )
        if not isinstance(record.get("prompt"), str):
            raise LorakitError(
                f'{where}: needs a string "prompt" (and optionally "adapter"), got {short_repr(record.get("prompt"))}'
            )
        adapter = record.get("adapter", default)
        if not isinstance(adapter, str):
            raise LorakitError(f'{where}: "adapter" must be a name, got {short_repr(adapter)}')
        jobs.append((check(adapter, where), check_text(record["prompt"], f'{where}: "prompt"')))
    return jobs


def _is_json_object(line: str) -> bool:
    import json

    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _json_object(line: str, where: str) -> dict:
    import json

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}); a .jsonl file (or one whose first "
            "line is a JSON object) is JSON Lines throughout: plain prompts go in a .txt file, one a line"
        ) from None
    except RecursionError:
        raise LorakitError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise LorakitError(f"{where}: a number with too many digits (over {sys.get_int_max_str_digits()})") from None
    if not isinstance(record, dict):
        hint = (
            "a list of records goes one record a line, JSON Lines"
            if isinstance(record, list) and record and all(isinstance(item, dict) for item in record)
            else "plain prompts go in a .txt file, one a line"
        )
        raise LorakitError(f'{where}: expected a JSON object {{"prompt": ...}}, got {type(record).__name__} ({hint})')
    return record
