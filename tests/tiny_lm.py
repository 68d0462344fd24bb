"""A tiny random causal LM and a tiny tokenizer saved to a directory: offline and fast.

Shared by the training and CLI tests (imported as a plain module; pytest puts tests/ on the path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Reverse the order of the words: apple river stone cloud tiger green lamp piano honey",
    "Answer: the quick brown fox jumps over the lazy dog 0123456789 , . ! ? : ; - _ ' \" { } [ ]",
    "instruction input output prompt completion text label positive negative good bad movie",
]


def save_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (vocabulary < 400) with a chat template and an eos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=380,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def save_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """A 2-layer random LlamaForCausalLM plus the tiny tokenizer, as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    save_tokenizer(directory)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=max(vocab, 400),
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def save_wordpiece_tokenizer(directory: Path) -> None:
    """A BERT WordPiece tokenizer over the corpus's words: [CLS] a [SEP] b [SEP] pair encoding
    with token_type_ids, as real BERT checkpoints have."""
    from transformers import BertTokenizerFast

    words = sorted({w for line in CORPUS for w in line.lower().split()})
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]) + "\n"
    )
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(directory)


def save_tiny_bert(directory: str | Path, seed: int = 0, wordpiece: bool = False) -> Path:
    """A 2-layer random BertModel config (classification heads are added on load) + tokenizer
    (the byte-level BPE one, or with `wordpiece` a BERT tokenizer with pair encoding)."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    if wordpiece:
        save_wordpiece_tokenizer(directory)
    else:
        save_tokenizer(directory)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=400,
        max_position_embeddings=256,
        pad_token_id=0 if wordpiece else 2,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_gguf(path: Path, seed: int = 0, hidden_size: int = 32, header: dict | None = None) -> Path:
    """A 2-layer random Llama as a GGUF file (f32, q/k rows as llama.cpp's converter orders them) with
    the tiny byte-level BPE tokenizer in its metadata, so that the model and its tokenizer load from
    the file alone. `header` overrides config values the header states (`{"intermediate_size": 96}`
    writes a header that disagrees with the tensors)."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    scratch = path.parent / f".{path.stem}-tokenizer"
    save_tokenizer(scratch)
    tok = json.loads((scratch / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    size = 400
    tokens += [f"<unused{i}>" for i in range(size - len(tokens))]
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    stated = {**config.to_dict(), **(header or {})}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(stated["num_hidden_layers"])
    writer.add_context_length(stated["max_position_embeddings"])
    writer.add_embedding_length(stated["hidden_size"])
    writer.add_feed_forward_length(stated["intermediate_size"])
    writer.add_head_count(stated["num_attention_heads"])
    writer.add_head_count_kv(stated["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(stated["vocab_size"])
    writer.add_rope_dimension_count(stated["hidden_size"] // stated["num_attention_heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embeddings, as in SmolLM2's file
        module, _, suffix = hf_name.rpartition(".")
        array = tensor.numpy()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        for projection, count in heads.items():
            if projection in module:
                array = (
                    array.reshape(count, 2, array.shape[0] // count // 2, *array.shape[1:])
                    .swapaxes(1, 2)
                    .reshape(array.shape)
                )
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    import shutil

    shutil.rmtree(scratch)
    return path
