"""Tokenizers that add a BOS token, or not, with chat templates that render one, or not: the token
ids `lorakit train` trains on for a prompt are the ids `lorakit generate` (and the exact-match
evaluation) feed for it, with exactly one BOS where the tokenizer adds one and none where it does not.

The tokenizers are built offline with `tokenizers` (byte-level BPE trained on a few lines); the
real code paths read the data (`build_datasets`), run `lorakit generate` (its `model.generate`
recorded) and the evaluation's greedy completions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.train import evaluate
from lorakit.train.data import IGNORE_INDEX
from lorakit.train.loop import build_datasets, check_config, load_tokenizer

CORPUS = [
    "Reverse the words: apple river stone cloud tiger green lamp",
    "Answer: the quick brown fox jumps over the lazy dog",
    "instruction input output prompt completion [INST] [/INST] user assistant",
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = 0, 1
# Llama 2 / Mistral / Gemma render the BOS in the template; ChatML (Qwen, SmolLM) has none.
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# kind -> (what the tokenizer adds around a text, its chat template, whether it wants a BOS)
KINDS = {
    "bos": ("<s> $A", TEMPLATE_WITH_BOS, True),  # Llama 3, Gemma (byte-level)
    "bos-sentencepiece": ("<s> $A", TEMPLATE_WITH_BOS, True),  # Llama 2, Mistral (a "▁" marks each word)
    "bos-template-without-bos": ("<s> $A", CHATML, True),
    "bos-and-eos": ("<s> $A </s>", TEMPLATE_WITH_BOS, True),  # add_eos_token=True
    "no-bos": (None, CHATML, False),  # GPT-2, Qwen, SmolLM
}


def save_model_dir(directory: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    single, template, _ = KINDS[kind]
    tok = Tokenizer(models.BPE())
    if kind == "bos-sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS) + "▁\n"))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if single is not None:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(fast),
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=sorted(KINDS))
def model_dir(request, tmp_path_factory):
    return request.param, save_model_dir(tmp_path_factory.mktemp(request.param), request.param)


PROMPT = "Reverse the words: apple river"
ANSWER = " river apple"


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def train_examples(directory: Path, data: str, *flags: str):
    """The examples `lorakit train` would train on (and evaluate with), with its tokenizer."""
    args = cli.build_parser().parse_args(
        ["train", "--model", str(directory), "--data", data, "--eval-data", data, "--metric", "eval_loss", *flags]
    )
    cfg = check_config(cli.resolve_train_config(args))
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    return build_datasets(cfg, tokenizer), tokenizer


def prompt_part(example) -> list[int]:
    """The ids before the first token the loss is on."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:first]


def generated_from(directory: Path, prompt: str, *flags: str, monkeypatch) -> list[int]:
    """The ids `lorakit generate` gives the model for `prompt`."""
    from transformers import LlamaForCausalLM

    seen = []

    def record(self, input_ids, attention_mask=None, **kwargs):
        seen.append(input_ids[attention_mask.bool()].tolist() if attention_mask is not None else input_ids[0].tolist())
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), EOS)], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", record)
    assert cli.main(["generate", "--model", str(directory), *flags, "--max-new-tokens", "2", prompt]) == 0
    (ids,) = seen
    return ids


def evaluated_from(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The ids the exact-match evaluation gives the model for each prompt (left-padded batch)."""
    seen = []

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, attention_mask, **kwargs):
            seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), EOS)], dim=1)

    evaluate.greedy_completions(Recorder(), tokenizer, prompts, 2, 8, torch.device("cpu"), False)
    return seen


def check_bos(ids: list[int], wants_bos: bool) -> None:
    assert ids.count(BOS) == (1 if wants_bos else 0), ids
    if wants_bos:
        assert ids[0] == BOS, ids


LAYOUTS = {
    "prompt-template-chat": ([{"prompt": PROMPT, "completion": ANSWER}], ["--prompt-template", "chat"], PROMPT, True),
    "alpaca-through-chat-template": (
        [{"instruction": "Reverse the words:", "input": "apple river", "output": ANSWER}],
        [],
        "Reverse the words:\n\napple river",
        True,
    ),
    "chat-messages": (
        [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}],
        [],
        PROMPT,
        True,
    ),
    "plain-prompt": ([{"prompt": PROMPT, "completion": ANSWER}], [], PROMPT, False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_train_eval_and_generate_feed_the_same_prompt_ids(layout, model_dir, tmp_path, monkeypatch):
    kind, directory = model_dir
    wants_bos = KINDS[kind][2]
    records, flags, user_text, chat = LAYOUTS[layout]
    datasets, tokenizer = train_examples(directory, write(tmp_path / "data.jsonl", records), *flags)
    (example,) = datasets.train
    check_bos(example.input_ids, wants_bos)
    if layout != "chat-messages":  # (a conversation ends as its template renders it)
        assert example.input_ids[-1] == EOS and example.input_ids.count(EOS) == 1, example.input_ids
    prompt_ids = prompt_part(example)
    assert prompt_ids == generated_from(directory, user_text, *(["--chat"] if chat else []), monkeypatch=monkeypatch)
    if example.prompt is not None:  # the exact-match evaluation generates from the same prompt
        assert evaluated_from(tokenizer, [example.prompt, example.prompt + " apple"])[0] == prompt_ids


def test_text_data_has_one_bos_and_one_eos(model_dir, tmp_path):
    kind, directory = model_dir
    datasets, _ = train_examples(directory, write(tmp_path / "text.jsonl", [{"text": "the quick brown fox"}]))
    (example,) = datasets.train
    check_bos(example.input_ids, KINDS[kind][2])
    assert example.input_ids[-1] == EOS and example.input_ids.count(EOS) == 1, example.input_ids


def test_generate_without_chat_feeds_the_plain_prompt_with_one_bos(model_dir, monkeypatch):
    kind, directory = model_dir
    ids = generated_from(directory, PROMPT, monkeypatch=monkeypatch)
    check_bos(ids, KINDS[kind][2])
    assert EOS not in ids  # a tokenizer that closes every text with EOS must not end the prompt with it
