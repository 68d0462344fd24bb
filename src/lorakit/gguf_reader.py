"""lorakit's GGUF reader: a GGUF file's header (metadata, tensor table) and its tensors, read lazily.

One module for every GGUF reader in lorakit: `models` streams a GGUF model through it (dense, or
straight into NF4 with `lorakit.quant.loading`), the tokenizer loader answers transformers'
metadata-only calls with it, and the GGUF export checks a base file with it.

The header is parsed here (config and tensor table, the vocabulary skipped: `gguf.GGUFReader` parses
every array element into its own numpy view, seconds and ~150 MB for SmolLM2's vocabulary); each
tensor is `pread` a chunk of rows at a time, dequantized with `gguf` and converted by transformers'
own per-tensor GGUF processors (name mapping, q/k un-permutation). It imports nothing of lorakit.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

_CHUNK_BYTES = 8 << 20  # raw bytes read and dequantized at a time


class _GGUFTensorInfo(NamedTuple):
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (outermost first), in elements
    offset: int  # absolute position of the first byte in the file
    n_bytes: int


class _GGUFArray(NamedTuple):
    """A metadata array of strings (a vocabulary, merges), skipped: only its length is kept."""

    count: int


# GGUF scalar value types -> struct format
_GGUF_SCALAR_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_SCALAR_BYTES = {t: struct.calcsize("<" + f) for t, f in _GGUF_SCALAR_FORMAT.items()}
_SHORT_ARRAY = 1024  # scalar arrays up to this long are read (a config may want them), longer ones skipped


class GGUFHeaderError(ValueError):
    """A GGUF file whose header cannot be what it says (truncated, counts larger than the file)."""


def _read_gguf_header(path: Path) -> tuple[dict, list[_GGUFTensorInfo]]:
    """(metadata, tensor table) of a GGUF file (v2/v3), read from its header alone; parsed once
    per file version (a load reads it for the tokenizer, the config and the tensor table).
    Callers must not modify the result.
    """
    stat = os.stat(path)
    return _read_gguf_header_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_gguf_header_cached(path: str, mtime_ns: int, size: int) -> tuple[dict, list[_GGUFTensorInfo]]:
    """(metadata, tensor table) of a GGUF file (v2/v3), read from its header alone.

    Metadata keeps scalars, strings and short scalar arrays; string arrays and long arrays (the
    tokenizer's vocabulary, merges, token types) are skipped by their lengths and stand as
    `_GGUFArray(count)`. `gguf.GGUFReader` parses every array element into its own numpy view
    (the 49k-token vocabulary of SmolLM2 takes seconds and ~150 MB).
    """
    from gguf import GGML_QUANT_SIZES

    size = os.path.getsize(path)
    with open(path, "rb") as f:

        def damaged(what: str) -> GGUFHeaderError:
            return GGUFHeaderError(f"{path}: damaged GGUF header ({what} at byte {f.tell()} of {size})")

        def unpack(fmt: str):
            raw = f.read(struct.calcsize("<" + fmt))
            if len(raw) != struct.calcsize("<" + fmt):
                raise damaged("the file ends inside the header")
            return struct.unpack("<" + fmt, raw)[0]

        def count(what: str, item_bytes: int = 1) -> int:
            # every item takes at least `item_bytes` of the file: a larger count is a damaged header
            n = unpack("Q")
            if n * item_bytes > size - f.tell():
                raise damaged(f"{what} {n} does not fit in the file")
            return n

        def string() -> str:
            try:
                return f.read(count("a string length")).decode("utf-8")
            except UnicodeDecodeError:
                raise damaged("a string that is not UTF-8") from None

        def value(value_type: int):
            if value_type == 8:
                return string()
            if value_type != 9:
                if value_type not in _GGUF_SCALAR_FORMAT:
                    raise damaged(f"unknown value type {value_type}")
                return unpack(_GGUF_SCALAR_FORMAT[value_type])
            item_type = unpack("I")
            if item_type in _GGUF_SCALAR_BYTES:
                n = count("an array length", _GGUF_SCALAR_BYTES[item_type])
                if n <= _SHORT_ARRAY:
                    return [unpack(_GGUF_SCALAR_FORMAT[item_type]) for _ in range(n)]
                f.seek(n * _GGUF_SCALAR_BYTES[item_type], 1)
            elif item_type in (8, 9):
                n = count("an array length", 8)
                for _ in range(n):
                    if item_type == 8:
                        f.seek(count("a string length"), 1)
                    else:
                        value(item_type)
            else:
                raise damaged(f"unknown array item type {item_type}")
            return _GGUFArray(n)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = unpack("I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
        if version > 3:
            raise ValueError(f"{path}: GGUF version {version} is newer than lorakit reads (2, 3)")
        tensor_count, kv_count = unpack("Q"), unpack("Q")
        if (tensor_count + kv_count) * 12 > size:  # a key or a tensor entry takes at least 12 bytes
            raise damaged(f"{tensor_count} tensors and {kv_count} keys do not fit in the file")
        metadata = {}
        for _ in range(kv_count):
            key, value_type = string(), unpack("I")
            metadata[key] = value(value_type)
        entries = []
        for _ in range(tensor_count):
            name = string()
            n_dims = unpack("I")
            if n_dims > 8:
                raise damaged(f"tensor {name!r} with {n_dims} dimensions")
            dims = [unpack("Q") for _ in range(n_dims)]
            entries.append((name, dims, unpack("I"), unpack("Q")))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or not 0 < alignment <= 1 << 20:
            raise damaged(f"general.alignment {alignment!r}")
        data_start = -(-f.tell() // alignment) * alignment
    if not isinstance(metadata.get("general.architecture"), str):
        raise ValueError(f"{path} has no general.architecture")
    table = []
    for name, dims, ggml_type, offset in entries:
        if ggml_type not in GGML_QUANT_SIZES:
            raise GGUFHeaderError(f"{path}: tensor {name!r} has an unknown type {ggml_type}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = math.prod(dims) // block_size * type_size
        if data_start + offset + n_bytes > size:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} ends at byte {data_start + offset + n_bytes}, past the end "
                f"of the file ({size} bytes): the file is truncated or damaged"
            )
        table.append(_GGUFTensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset, n_bytes))
    _check_header_values(path, metadata)
    return metadata, table


# the model settings a header states (under its architecture's prefix): integers, at least 1 and at most
# this (a layer count of 2^31 would be built before any tensor is read), or positive finite numbers
_HEADER_INTS = {
    "block_count": 1 << 12,
    "context_length": 1 << 24,
    "embedding_length": 1 << 20,
    "feed_forward_length": 1 << 22,
    "attention.head_count": 1 << 16,
    "attention.head_count_kv": 1 << 16,
    "attention.key_length": 1 << 16,
    "attention.value_length": 1 << 16,
    "rope.dimension_count": 1 << 16,
    "vocab_size": 1 << 24,
}
_HEADER_FLOATS = (
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "rope.freq_base",
    "rope.scaling.factor",
)
_TOKEN_IDS = ("bos", "eos", "pad", "unknown", "sep", "eot")


def _check_header_values(path: str, metadata: dict) -> None:
    """Refuse a header whose model settings no model can have (a layer count of 0, a string where a
    number goes, a token id past the vocabulary): transformers would fail on each in its own words,
    deep inside building the config, the tokenizer or the model."""
    architecture = metadata["general.architecture"]

    def refuse(key: str, value, wanted: str) -> GGUFHeaderError:
        shown = value if not isinstance(value, (list, str)) or len(str(value)) < 60 else f"{str(value)[:60]}..."
        return GGUFHeaderError(f"{path}: the header's {key} is {shown!r}; {wanted} (a damaged or hand-edited file)")

    for suffix, limit in _HEADER_INTS.items():
        key = f"{architecture}.{suffix}"
        if key in metadata:
            value = metadata[key]
            per_layer = suffix in ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
            values = value if isinstance(value, list) and per_layer else [value]  # some models set these per layer
            if not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in values
            ):
                raise refuse(key, value, f"expected a whole number from 1 to {limit}")
    for suffix in _HEADER_FLOATS:
        key = f"{architecture}.{suffix}"
        if key in metadata:
            value = metadata[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise refuse(key, value, "expected a positive finite number")
    heads, kv_heads = (
        metadata.get(f"{architecture}.attention.head_count"),
        metadata.get(f"{architecture}.attention.head_count_kv"),
    )
    width = metadata.get(f"{architecture}.embedding_length")
    if (
        isinstance(heads, int)
        and isinstance(width, int)
        and f"{architecture}.attention.key_length" not in metadata
        and width % heads
    ):
        raise refuse(f"{architecture}.attention.head_count", heads, f"it must divide the embedding length {width}")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise refuse(f"{architecture}.attention.head_count_kv", kv_heads, f"it must divide the head count {heads}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if "tokenizer.ggml.tokens" in metadata:
        count = tokens.count if isinstance(tokens, _GGUFArray) else len(tokens) if isinstance(tokens, list) else 0
        if count < 1:
            raise refuse("tokenizer.ggml.tokens", tokens, "expected the vocabulary, a list of token strings")
        for name in _TOKEN_IDS:
            key = f"tokenizer.ggml.{name}_token_id"
            value = metadata.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count):
                raise refuse(key, value, f"expected a token id below the vocabulary's {count} tokens")


def _gguf_tensor_table(path: Path) -> tuple[str, list[_GGUFTensorInfo]]:
    """(architecture, tensor table) of a GGUF file."""
    metadata, table = _read_gguf_header(path)
    return metadata["general.architecture"], table


# Architectures whose transformers config is the plain renaming of their GGUF metadata (no
# special cases in transformers' GGUF loader); others are left to transformers.
_PLAIN_GGUF_CONFIG_ARCHITECTURES = ("llama",)


def _gguf_config_dict(path: Path) -> dict | None:
    """The config dict transformers' GGUF loader makes for this file (`load_gguf_checkpoint(...)["config"]`),
    rebuilt from lorakit's header reader with transformers' own key mapping; None where the
    architecture needs transformers' special cases.

    transformers' loader parses the whole file for it, the tokenizer's vocabulary included
    (SmolLM2: ~5 s, for the config and again for the tokenizer's class).
    """
    metadata, table = _read_gguf_header(path)
    architecture = metadata["general.architecture"]
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

        config_renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    except ImportError:
        return None
    name = metadata.get("general.name", "")
    if (
        architecture not in config_renames
        or architecture not in _PLAIN_GGUF_CONFIG_ARCHITECTURES
        or "mistral" in name.lower()
    ):
        return None
    config = {"tie_word_embeddings": all(t.name != "output.weight" for t in table)}
    for key, value in metadata.items():  # general.architecture -> model_type, tokenizer.ggml.bos_token_id, ...
        prefix, _, field = key.partition(".")
        target = config_renames.get(prefix, {}).get(field)
        if target not in (None, -1) and not isinstance(value, _GGUFArray):
            config[target] = value[0] if isinstance(value, list) and len(value) == 1 else value  # as transformers
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), _GGUFArray):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"].count
    return config


def _gguf_config(path: Path):
    """The transformers config of a GGUF model, as `AutoConfig.from_pretrained(gguf_file=...)` makes it."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _gguf_config_dict(path)
    if config is None:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    built = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    built._name_or_path = str(path.parent)  # as from_pretrained(directory, gguf_file=...) records it
    return built


@contextmanager
def gguf_config_from_header(path: Path) -> Iterator[None]:
    """Inside the block, transformers' GGUF loader answers a metadata-only call for `path` with
    `_gguf_config_dict` instead of parsing the whole file (`AutoTokenizer.from_pretrained(gguf_file=...)`
    makes such a call just to choose the tokenizer's class)."""
    from transformers import modeling_gguf_pytorch_utils as utils

    original = utils.load_gguf_checkpoint
    try:
        config = _gguf_config_dict(path)
    except GGUFHeaderError:
        raise  # a damaged file: transformers' reader would fail on it less clearly (or run out of memory)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError):
        config = None  # a header this reader cannot parse: transformers' own loader decides

    def load_gguf_checkpoint(gguf_checkpoint_path, return_tensors=False, **kwargs):
        if config is not None and not return_tensors and Path(gguf_checkpoint_path).resolve() == path.resolve():
            return {"config": dict(config), "tokenizer": {}, "tokenizer_config": {}}
        return original(gguf_checkpoint_path, return_tensors=return_tensors, **kwargs)

    utils.load_gguf_checkpoint = load_gguf_checkpoint
    try:
        yield
    finally:
        utils.load_gguf_checkpoint = original


@contextmanager
def _tensor_name_map_cached() -> Iterator[None]:
    """Build gguf's name table once while transformers maps the model's names.

    `get_gguf_hf_weights_map` recurses into every submodule and rebuilds the same
    `gguf.get_tensor_name_map(arch, layers)` table for each (about 6 s for SmolLM2's ~400
    modules); the table depends on its two arguments only.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _gguf_tensors(path: Path, model: nn.Module, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(model parameter name, fp32 tensor) for each GGUF tensor, converted as transformers does.

    Name mapping and per-tensor fixes (the q/k un-permutation of Llama) are transformers' own
    GGUF processors. The file is read with `pread` a chunk of rows at a time, not through a
    memory map: file pages already consumed do not stay in the process's resident memory, and a
    quantized tensor (the Q8_0 embedding table) is dequantized chunk by chunk into its fp32
    result instead of through whole-tensor temporaries.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture, table = _gguf_tensor_table(path)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    with _tensor_name_map_cached():
        mapping = get_gguf_hf_weights_map(model, processor)
    parsed = {"config": config, "tensors": {}}
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in table:
            rows = math.prod(info.shape[:-1])
            row_bytes = info.n_bytes // rows
            step = max(1, _CHUNK_BYTES // row_bytes)
            out = np.empty((rows, info.shape[-1]), dtype=np.float32)
            for first in range(0, rows, step):
                count = min(step, rows - first)
                raw = np.frombuffer(os.pread(fd, count * row_bytes, info.offset + first * row_bytes), dtype=np.uint8)
                out[first : first + count] = dequantize(
                    raw.reshape(count, row_bytes), GGMLQuantizationType(info.ggml_type)
                )
            weights = out.reshape(info.shape)
            result = processor.process(
                weights=weights, name=info.name, tensor_key_mapping=mapping, parsed_parameters=parsed
            )
            del out, weights
            if result.name in mapping:
                weights = result.weights
                if not (weights.flags.writeable and weights.flags.c_contiguous):
                    weights = np.array(weights)
                yield mapping[result.name], torch.from_numpy(weights)
    finally:
        os.close(fd)
