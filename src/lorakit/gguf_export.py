"""Export to GGUF, the format of llama.cpp (and Ollama, LM Studio): a LoRA adapter file, or a whole
merged model.

An adapter file holds, for each adapted weight `<gguf name>.weight` of the base, the pair
`<gguf name>.weight.lora_a` (r, in) and `.lora_b` (out, r) (numpy order; GGUF's own dimension order
is reversed), with `general.type = adapter`, `adapter.type = lora`, the base's architecture and one
`adapter.lora.alpha`. llama.cpp computes, for each adapted weight W,

    y = W x + (alpha / r) · B (A x)          (r = the pair's own rank, B's column count)

so every scale llama.cpp does not know (LoRA's alpha / r per module, rsLoRA, VeRA's d and b,
AdaLoRA's E and its scale) is folded into the pair: the adapter's `low_rank_factors()` gives
`(down, up)` with `up @ down = ΔW`, and B is written as `up · r / alpha`, A as `down`.

The base's GGUF conversion may store a weight in another row order than the Hugging Face model
(llama.cpp permutes Llama's q and k rows for its rotary embedding). Whatever row permutation it
applied, B's rows must follow (A, on the input side, does not move). The permutation is found by
running transformers' own GGUF tensor processor (which undoes the conversion when loading) on a
column of row indices; an architecture whose processor does more than permute rows is refused.

A merged model (`export_merged`) copies the base GGUF's metadata and tokenizer and writes every
weight the model holds as lorakit runs it (merged where adapted), converted back to the file's row
order and encoded as f32, f16 or q8_0. DoRA and Delta-LoRA, whose change is not a plain low-rank
pair on the base llama.cpp loads, export this way only. A QLoRA adapter is merged into the
dequantized 4-bit weights it was trained against, not the full-precision ones.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import base_layers, files, inject
from .errors import LorakitError

ADAPTER_OUTTYPES = ("f32", "f16")
MERGED_OUTTYPES = ("f32", "f16", "q8_0")

# Hugging Face model types -> the architecture llama.cpp's converter writes for them (for a base given
# as a Hugging Face directory; a GGUF base names its own).
_HF_TO_GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class ExportSummary:
    """What an export wrote, for the command's report and the tests."""

    path: Path
    kind: str  # "adapter" or "merged"
    architecture: str
    tensors: int
    bytes: int
    modules: int  # adapted modules written (adapter) or merged (merged)
    alpha: float | None = None
    outtype: str = "f32"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        size = f"{self.bytes / 2**20:.2f} MiB"
        head = (
            f"GGUF {'LoRA adapter' if self.kind == 'adapter' else 'merged model'} written to {self.path} "
            f"({self.architecture}, {self.tensors} tensors, {size}, {self.outtype})"
        )
        return [head, *self.notes]


def export_gguf(
    model: nn.Module, out: str | os.PathLike, base: str | os.PathLike, merged: bool = False, outtype: str | None = None
) -> ExportSummary:
    """Write `model`'s active adapter as a GGUF LoRA adapter for llama.cpp, or (`merged`) the whole model
    with it merged (`model` is changed: its adapters are merged and unloaded).

    `base` is what the model was loaded from: its .gguf file (needed for `merged`: its tokenizer and
    metadata are copied; for an adapter its tensor shapes are checked) or its Hugging Face directory.
    `outtype`: adapter f32 (default) or f16; merged f16 (default), f32 or q8_0.

        model = lorakit.load(base_model, "runs/x/adapter")
        lorakit.export_gguf(model, "adapter.gguf", base="SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    base = Path(base)
    model_dir, gguf_file = (base.parent, base.name) if base.suffix == ".gguf" else (base, None)
    if merged:
        require_gguf_base(base if gguf_file else None)
    layout = gguf_layout(model, model_dir, gguf_file)
    if not merged:
        return export_adapter(model, layout, Path(out), outtype or "f32")
    inject.merge_and_unload(model)
    return export_merged(model, layout, Path(out), outtype or "f16")


# --- how the base's GGUF conversion names and orders each weight -------------------------------------


@dataclass
class GGUFLayout:
    """The base model's GGUF names and row orders.

    Attributes:
        architecture: llama.cpp's architecture name (`general.architecture`).
        base_file: the base's .gguf file, or None for a Hugging Face directory.
        base_shapes: GGUF tensor name -> numpy-order shape, from the base file (None without one).
    """

    architecture: str
    base_file: Path | None
    base_shapes: dict[str, tuple[int, ...]] | None
    name_map: object
    processor: object

    def tensor_name(self, module_name: str) -> str | None:
        """`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj`; None where llama.cpp has no such weight."""
        name = self.name_map.get_name(module_name)
        return None if name is None else f"{name}.weight"

    def row_order(self, tensor_name: str, rows: int) -> np.ndarray:
        """Index `order` such that `gguf_rows = hf_rows[order]` for this weight.

        transformers' processor maps the file's rows to the model's (`hf = gguf[perm]`); running it
        on a column of row numbers reads `perm` off, and `order = argsort(perm)` inverts it.
        """
        probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        result = self.processor.process(weights=probe, name=tensor_name, tensor_key_mapping={}, parsed_parameters={})
        perm = np.asarray(result.weights).reshape(-1)
        if result.name != tensor_name or perm.shape != (rows,) or not np.array_equal(np.sort(perm), probe[:, 0]):
            raise LorakitError(
                f"the {self.architecture} GGUF conversion transforms {tensor_name} in a way a LoRA "
                "adapter cannot follow; export the merged model instead (--merged)"
            )
        return np.argsort(perm.astype(np.int64))


def gguf_layout(model: nn.Module, model_dir: Path, gguf_file: str | None) -> GGUFLayout:
    """The GGUF layout of the base the model was loaded from (a .gguf file or a Hugging Face directory)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .gguf_reader import GGUFHeaderError, _read_gguf_header

    base_file = model_dir / gguf_file if gguf_file else None
    base_shapes = None
    if base_file is not None:
        try:
            metadata, table = _read_gguf_header(base_file)
        except (GGUFHeaderError, OSError) as err:
            raise LorakitError(f"cannot read the base GGUF file {base_file}: {err}") from None
        architecture = str(metadata.get("general.architecture", ""))
        base_shapes = {info.name: tuple(info.shape) for info in table}
    else:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in _HF_TO_GGUF_ARCHITECTURE:
            raise LorakitError(
                f"GGUF export needs a base llama.cpp converts: a .gguf file, or a Hugging Face {', '.join(sorted(_HF_TO_GGUF_ARCHITECTURE))} "
                f"model; this base is {model_type!r}. Use `lorakit merge` for a Hugging Face directory instead"
            )
        architecture = _HF_TO_GGUF_ARCHITECTURE[model_type]
    arch_ids = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if architecture not in arch_ids:
        raise LorakitError(f"the base's GGUF architecture {architecture!r} is unknown to the installed gguf package")
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class.__name__ not in ("TensorProcessor", "LlamaTensorProcessor"):
        raise LorakitError(
            f"GGUF export does not support the {architecture!r} architecture yet (its conversion changes weights "
            "beyond renaming and row order); use `lorakit merge` and llama.cpp's convert_hf_to_gguf.py"
        )
    blocks = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    name_map = gguf.get_tensor_name_map(arch_ids[architecture], blocks)
    return GGUFLayout(architecture, base_file, base_shapes, name_map, processor_class(config=model.config.to_dict()))


# --- the adapter file ----------------------------------------------------------------------------------


def export_adapter(
    model: nn.Module,
    layout: GGUFLayout,
    out: Path,
    outtype: str = "f32",
    name: str = inject.DEFAULT_NAME,
    description: str | None = None,
) -> ExportSummary:
    """Write the adapter `name` of `model` (base + loaded adapter) as a GGUF LoRA adapter file."""
    if outtype not in ADAPTER_OUTTYPES:
        raise LorakitError(
            f"--outtype {outtype!r} is not available for an adapter: choose {', '.join(ADAPTER_OUTTYPES)}"
        )
    config = inject.adapter_config(model, name)
    method = type(config).__name__
    if config.train_modules:
        raise LorakitError(
            f"the adapter trains whole modules ({', '.join(config.train_modules)}), which a GGUF LoRA "
            "adapter cannot hold; export the merged model instead (--merged)"
        )
    if config.moves_base_weights:
        raise LorakitError(
            f"{method} also changes the base weights themselves, which a GGUF LoRA adapter cannot "
            "hold; export the merged model instead (--merged)"
        )
    import gguf

    pairs = list(_gguf_pairs(model, layout, name, method))
    alpha = _file_alpha(config, pairs)
    kind = gguf.GGMLQuantizationType.F32 if outtype == "f32" else gguf.GGMLQuantizationType.F16
    plan = []
    for tensor_name, down, up in pairs:
        b = up * np.float32(up.shape[1] / alpha)  # llama.cpp multiplies by alpha / r
        plan.append(PlannedTensor(f"{tensor_name}.lora_a", down.shape, kind, lambda t=down: _encode(t, kind)))
        plan.append(PlannedTensor(f"{tensor_name}.lora_b", b.shape, kind, lambda t=b: _encode(t, kind)))

    def add_metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(description or f"lorakit {method} adapter")

    size = _write_gguf(out, layout.architecture, add_metadata, plan)
    base = shlex.quote(str(layout.base_file)) if layout.base_file is not None else "BASE.gguf"
    notes = [f"{len(pairs)} adapted weights; run it in llama.cpp: llama-cli -m {base} --lora {shlex.quote(str(out))}"]
    if layout.base_file is None:
        notes.append("BASE.gguf: this base model converted by llama.cpp's convert_hf_to_gguf.py")
    adapted = sum(1 for _ in inject.adapted_layers(model, name))
    if len(pairs) < adapted:
        notes.append(f"{adapted - len(pairs)} module(s) kept no rank (their change is zero) and are not written")
    return ExportSummary(out, "adapter", layout.architecture, len(plan), size, len(pairs), alpha, outtype, notes)


def _gguf_pairs(
    model: nn.Module, layout: GGUFLayout, name: str, method: str
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(GGUF weight name, A (r, in), B·scale (out, r) in the file's row order) per adapted module."""
    for module_name, layer in inject.adapted_layers(model, name):
        adapter = layer.adapters[name]
        factors = adapter.low_rank_factors() if getattr(adapter, "additive", False) else None
        if factors is None:
            raise LorakitError(
                f"{method}'s change to {module_name} is not a plain low-rank pair (it depends on the "
                "base weight), which a GGUF LoRA adapter cannot hold; export the merged model instead (--merged)"
            )
        if not isinstance(layer.base_layer, nn.Linear) and not isinstance(
            layer.base_layer, base_layers.DenseWeightProvider
        ):
            raise LorakitError(
                f"{module_name} is a {type(layer.base_layer).__name__}, not a linear layer llama.cpp "
                "adapts; export the merged model instead (--merged)"
            )
        tensor_name = layout.tensor_name(module_name)
        if tensor_name is None:
            raise LorakitError(
                f"{module_name} has no weight in llama.cpp's {layout.architecture} layout; export "
                "the merged model instead (--merged)"
            )
        down, up = (t.detach().to(device="cpu", dtype=torch.float32).numpy() for t in factors)
        if up.shape[1] == 0:
            continue  # AdaLoRA pruned every triplet here: nothing to add
        _check_base_shape(layout, module_name, tensor_name, (up.shape[0], down.shape[1]))
        yield (
            tensor_name,
            np.ascontiguousarray(down),
            np.ascontiguousarray(up[layout.row_order(tensor_name, up.shape[0])]),
        )


def _check_base_shape(layout: GGUFLayout, module_name: str, tensor_name: str, shape: tuple[int, int]) -> None:
    if layout.base_shapes is None:
        return
    if tensor_name not in layout.base_shapes:
        tied = " (the output head is tied to the token embeddings there)" if tensor_name == "output.weight" else ""
        raise LorakitError(
            f"the base GGUF file has no {tensor_name} for {module_name}{tied}: llama.cpp cannot apply an "
            "adapter to it; export the merged model instead (--merged)"
        )
    if tuple(layout.base_shapes[tensor_name]) != shape:
        raise LorakitError(
            f"{module_name}: the adapter's change is {shape} but the base GGUF file's {tensor_name} is "
            f"{tuple(layout.base_shapes[tensor_name])}: a different base model"
        )


def _file_alpha(config, pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> float:
    """The one alpha the file records. Scales are folded into B, so any positive value is exact; the
    config's alpha keeps a plain LoRA's B as trained."""
    alpha = getattr(config, "alpha", None)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0:
        return float(alpha)
    return float(max((up.shape[1] for _, _, up in pairs), default=1))


# --- the merged model ----------------------------------------------------------------------------------


def export_merged(
    model: nn.Module, layout: GGUFLayout, out: Path, outtype: str = "f16", notes: list[str] | None = None
) -> ExportSummary:
    """Write `model` (adapters merged, i.e. after `merge_and_unload`) as a whole GGUF model, with the
    base GGUF file's metadata and tokenizer, every weight as the model holds it."""
    import gguf

    if outtype not in MERGED_OUTTYPES:
        raise LorakitError(
            f"--outtype {outtype!r} is not available for a merged model: choose {', '.join(MERGED_OUTTYPES)}"
        )
    require_gguf_base(layout.base_file)
    weights = _model_weights(model)
    gguf_to_hf = {}
    for hf_name in weights:
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = layout.name_map.get_name(stem)
        if gguf_stem is not None:
            gguf_to_hf.setdefault(f"{gguf_stem}.{suffix}", hf_name)  # a tied head maps after the embedding it shares
    reader = gguf.GGUFReader(layout.base_file)
    from_base = [t.name for t in reader.tensors if t.name not in gguf_to_hf]
    written = len(reader.tensors) - len(from_base)

    def add_metadata(writer) -> None:
        for item in reader.fields.values():
            if item.name.startswith("GGUF.") or item.name in ("general.architecture", "general.file_type"):
                continue
            value_type = item.types[0]
            sub_type = item.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[outtype]
        )

    def make(info, hf_name: str | None):
        def tensor() -> np.ndarray:
            if hf_name is None:  # not a model weight (e.g. rope frequencies): as the base has it
                value = gguf.quants.dequantize(info.data, info.tensor_type)
            else:
                value = weights[hf_name].detach().to(device="cpu", dtype=torch.float32).numpy()
                if value.ndim >= 1:  # a bias follows its weight's rows
                    value = value[layout.row_order(info.name, value.shape[0])]
            return _encode(value, _encoded_kind(value.shape, outtype))

        return tensor

    plan = []
    for info in reader.tensors:
        shape = tuple(int(n) for n in reversed(info.shape))  # GGUF lists dimensions innermost first
        hf_name = gguf_to_hf.get(info.name)
        if hf_name is not None and tuple(weights[hf_name].shape) != shape:
            raise LorakitError(
                f"{hf_name} is {tuple(weights[hf_name].shape)} in the model but {shape} in the base GGUF "
                f"file {layout.base_file.name}: a different base model"
            )
        plan.append(PlannedTensor(info.name, shape, _encoded_kind(shape, outtype), make(info, hf_name)))
    size = _write_gguf(out, layout.architecture, add_metadata, plan)
    notes = list(notes or [])
    if from_base:
        notes.append(
            f"{len(from_base)} tensor(s) the model has no weight for, copied from the base file as they are: "
            f"{', '.join(from_base[:5])}{' ...' if len(from_base) > 5 else ''}"
        )
    return ExportSummary(out, "merged", layout.architecture, len(plan), size, written, None, outtype, notes)


def require_gguf_base(base_file: Path | None) -> None:
    """A merged GGUF copies the base file's tokenizer and metadata: refuse a base without one."""
    if base_file is None:
        raise LorakitError(
            "--merged --format gguf copies the base GGUF file's tokenizer and metadata, and this base is "
            "a Hugging Face directory: write the merged model with `lorakit merge` and convert it with "
            "llama.cpp's convert_hf_to_gguf.py"
        )


def _model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> dense tensor, with a 4-bit layer's weight dequantized (as lorakit computes with it)."""
    weights = dict(model.state_dict())
    for module_name, module in model.named_modules():
        if isinstance(module, base_layers.DenseWeightProvider):
            prefix = f"{module_name}." if module_name else ""
            for key in [k for k in weights if k.startswith(prefix) and "." not in k[len(prefix) :]]:
                del weights[key]
            weights[f"{prefix}weight"] = module.dense_weight()
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                weights[f"{prefix}bias"] = bias
    return weights


def _encoded_kind(shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is written in: vectors stay f32 (as llama.cpp's converter keeps norms);
    q8_0 needs rows in blocks of 32 and falls back to f16 otherwise."""
    import gguf

    kind = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return kind.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[kind.Q8_0][0] == 0:
        return kind.Q8_0
    return kind.F16


def _encode(value: np.ndarray, kind) -> np.ndarray:
    import gguf

    value = np.ascontiguousarray(value, dtype=np.float32)
    if kind == gguf.GGMLQuantizationType.F32:
        return value
    if kind == gguf.GGMLQuantizationType.F16:
        return value.astype(np.float16)
    return gguf.quants.quantize(value, kind)


# --- writing -------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One tensor of the file: its name, numpy-order shape and GGML type, and how to make its data
    (called once, while the file is written, so only one tensor is in memory at a time)."""

    name: str
    shape: tuple[int, ...]
    kind: object  # gguf.GGMLQuantizationType
    make: object  # () -> np.ndarray, already encoded as `kind`


def _write_gguf(out: Path, architecture: str, add_metadata, plan: list[PlannedTensor]) -> int:
    """Write a GGUF file atomically (`lorakit.files.atomic_write`); returns its size in bytes."""
    import gguf

    kind = gguf.GGMLQuantizationType
    files.make_directory(out.parent, "--out")
    files.clean_temporaries(out.parent, out.name)  # what a killed export of this file left

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        add_metadata(writer)
        for item in plan:
            if item.kind == kind.F32:
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), 4 * math.prod(item.shape))
            elif item.kind == kind.F16:
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float16), 2 * math.prod(item.shape))
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, item.kind)
                writer.add_tensor_info(
                    item.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=item.kind
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            writer.write_tensor_data(item.make())
        writer.close()

    files.atomic_write(out, write)  # a kill or a full disk leaves the earlier file (if any) as it was
    return out.stat().st_size
