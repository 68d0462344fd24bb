"""Streaming a GGUF file into an NF4 model: header reader, chunked dequantization, exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from lorakit import gguf_reader
from lorakit.inject import lorakit_state
from lorakit.models import load_causal_lm
from lorakit.quant import load_quantized_causal_lm, quantize

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections (transformers undoes it)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(path, model) -> None:
    """`model` (a tiny Llama) as a GGUF file: Q8_0 matrices, an F16 one, F32 norms, a tokenizer,
    a non-default alignment, and no output tensor (the head is tied, as in SmolLM2's file)."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_custom_alignment(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges(["t 1"])
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue
        module, _, suffix = hf_name.rpartition(".")
        array = tensor.numpy()
        if "q_proj" in module:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif "k_proj" in module:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        name = f"{names.get_name(module)}.{suffix}"
        if array.ndim == 1:
            writer.add_tensor(name, array.astype(np.float32))
        elif "v_proj" in module:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model = tiny_llama(seed=4)
    model.model.embed_tokens.weight.data = model.lm_head.weight.data.clone()  # the file has one table
    write_tiny_gguf(path, model)
    return path, model


def test_header_reader_agrees_with_gguf_reader(tiny_gguf):
    path, _ = tiny_gguf
    architecture, table = gguf_reader._gguf_tensor_table(path)
    reader = gguf.GGUFReader(str(path))
    assert architecture == "llama"
    assert [t.name for t in table] == [t.name for t in reader.tensors]
    for ours, theirs in zip(table, reader.tensors):
        assert ours.ggml_type == int(theirs.tensor_type)
        assert ours.offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape))


def test_dense_load_equals_transformers_gguf_loader(tiny_gguf, input_ids):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    ours = load_causal_lm(str(path))
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    # transformers also records the GGUF file as a "quantization_config" (dequantize=False), which then
    # travels into merged checkpoints; the model holds plain dense weights, so lorakit records none
    assert "quantization_config" not in ours.config.to_dict()
    assert ours.config.to_dict() == {k: v for k, v in theirs.config.to_dict().items() if k != "quantization_config"}
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for key in mine:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    assert torch.equal(ours(input_ids).logits, theirs(input_ids).logits)
    assert not ours.training and all(p.requires_grad for p in ours.parameters())  # as from_pretrained leaves it


def test_config_from_header_equals_transformers(tiny_gguf):
    from transformers import AutoConfig

    path, _ = tiny_gguf
    ours = gguf_reader._gguf_config(path)
    assert ours.to_dict() == AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


@pytest.mark.integration
def test_smollm2_config_from_header_equals_transformers():
    from transformers import AutoConfig

    from lorakit.models import resolve_model_path

    directory, gguf = resolve_model_path(None, "causal-lm")
    ours = gguf_reader._gguf_config(directory / gguf)
    assert ours.to_dict() == AutoConfig.from_pretrained(directory, gguf_file=gguf).to_dict()


def test_header_reader_rejects_other_files(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_reader._gguf_tensor_table(path)


def test_streamed_gguf_equals_quantize_after_load(tiny_gguf, monkeypatch, input_ids):
    path, original = tiny_gguf
    monkeypatch.setattr(gguf_reader, "_CHUNK_BYTES", 100)  # a few rows per read: every chunk edge runs
    streamed = load_quantized_causal_lm(str(path))
    reference = quantize(load_causal_lm(str(path)))
    assert lorakit_state(streamed).quantization == lorakit_state(reference).quantization
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(streamed(input_ids).logits, reference(input_ids).logits)
    # and the file round-trips the original weights (Q8_0 / F16 rounding only; q/k un-permuted)
    dense = load_causal_lm(str(path)).state_dict()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(dense[key], value, atol=0.01, rtol=0.02)


def test_config_shortcut_is_scoped_and_only_for_its_file(tiny_gguf, tmp_path):
    from transformers import modeling_gguf_pytorch_utils as utils

    path, _ = tiny_gguf
    original = utils.load_gguf_checkpoint
    with gguf_reader.gguf_config_from_header(path):
        assert utils.load_gguf_checkpoint(str(path))["config"] == gguf_reader._gguf_config_dict(path)
        other = tmp_path / "other.gguf"
        other.write_bytes(path.read_bytes())
        assert utils.load_gguf_checkpoint(str(other))["config"]["model_type"] == "llama"  # transformers' own parse
    assert utils.load_gguf_checkpoint is original


@pytest.mark.integration
def test_smollm2_tokenizer_equals_transformers():
    from transformers import AutoTokenizer

    from lorakit.models import load_tokenizer, resolve_model_path

    directory, gguf = resolve_model_path(None, "causal-lm")
    theirs = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    ours = load_tokenizer(None)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.chat_template == theirs.chat_template and ours.init_kwargs == theirs.init_kwargs
    for text in ["Hello world!", "  tabs\tand\n\nnewlines 123 ü 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text).input_ids == theirs(text).input_ids


@pytest.mark.integration
def test_smollm2_dense_load_equals_transformers():
    from transformers import AutoModelForCausalLM

    from lorakit.models import resolve_model_path

    directory, gguf = resolve_model_path(None, "causal-lm")
    ours = load_causal_lm(None).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def _damaged_variants(data: bytes) -> dict[str, bytes]:
    """The tiny GGUF file cut short or with impossible numbers in its header."""
    import struct

    def patch(offset: int, fmt: str, value: int) -> bytes:
        return data[:offset] + struct.pack("<" + fmt, value) + data[offset + struct.calcsize("<" + fmt) :]

    variants = {f"truncated at {n}": data[:n] for n in (6, 20, 40, 200, len(data) // 2, len(data) - 3)}
    variants["2^62 tensors"] = patch(8, "Q", 2**62)
    variants["2^62 keys"] = patch(16, "Q", 2**62)
    variants["a 2^62-byte key"] = patch(24, "Q", 2**62)
    key_length = struct.unpack("<Q", data[24:32])[0]
    variants["unknown value type"] = patch(32 + key_length, "I", 77)
    return variants


def test_damaged_gguf_headers_are_one_clear_error(tiny_gguf, tmp_path, capsys):
    from lorakit import cli

    path, _ = tiny_gguf
    for what, content in _damaged_variants(path.read_bytes()).items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=r"bad\.gguf: (damaged GGUF header|tensor .* past the end|.*not a GGUF)"):
            gguf_reader._gguf_tensor_table(bad)
        gguf_reader._read_gguf_header_cached.cache_clear()
        code = cli.main(
            ["train", "--model", str(bad), "--steps", "1", "--out-dir", str(tmp_path / "runs"), "--no-progress"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "bad.gguf" in err[0], (what, err)
