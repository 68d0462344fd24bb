"""Loading a causal LM straight into 4-bit, one weight at a time.

`load_quantized_causal_lm` builds the model with its parameters on the `meta` device (no
memory), then reads the checkpoint tensor by tensor: a weight of a chosen linear layer is
quantized to NF4 as soon as it arrives and its dense copy is dropped; every other tensor is
placed as it is. The dense model never exists, so peak memory stays near the 4-bit model plus
the largest single tensor (plus the file pages the OS maps in).

Sources: a Hugging Face directory of `.safetensors` files (read with `safe_open`, one tensor at a
time), or a GGUF file, read tensor by tensor with the `gguf` reader and converted by
transformers' own per-tensor GGUF processors (name mapping, q/k un-permutation).

The result is bit-identical to `quantize(load_causal_lm(spec), ...)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..methods.base import AdapterConfig
from .linear4bit import Linear4bit
from .nf4 import DEFAULT_BLOCKSIZE


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every new parameter on the meta device (buffers such as rotary tables stay real)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _safetensors_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _gguf_tensors(path: Path, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(model parameter name, fp32 tensor) for each GGUF tensor, converted as transformers does."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # config and tokenizer only
    parsed["tensors"] = {}
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.copy(result.weights))


def load_quantized_causal_lm(
    spec: str | None = None,
    targets: str | list[str] = "all-linear",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A causal LM (default: the built-in SmolLM2-135M) with its linear layers loaded as NF4.

    `spec` is as in `lorakit.models.load_causal_lm` (built-in name, local directory, `.gguf`
    file). Non-quantized tensors (embeddings, norms, the output head) get `dtype`, and weights
    are rounded to `dtype` before quantization, so the result equals
    `lorakit.quantize(load_causal_lm(spec, dtype), targets, blocksize, double_quant, compute_dtype)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..inject import set_submodule, select_targets
    from ..models import _offline, resolve_model_path
    from . import _quantizable, quantization_settings

    _offline()
    directory, gguf = resolve_model_path(spec, "causal-lm")
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(directory)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    chosen = {
        n for n in select_targets(model, AdapterConfig(targets=targets)) if _quantizable(model.get_submodule(n))
    }
    cdtype = getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    tensors = _gguf_tensors(directory / gguf, model) if gguf else _safetensors_tensors(directory)
    unexpected = []
    for name, tensor in tensors:
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            unexpected.append(name)
            continue
        tensor = tensor.to(dtype)
        if module_name in chosen and attr == "weight":
            layer = Linear4bit.from_linear(_with_weight(module, tensor), blocksize, double_quant, cdtype)
            if getattr(module, "bias", None) is not None and module.bias.is_meta:
                layer.bias = module.bias  # filled when the bias tensor arrives
            set_submodule(model, module_name, layer)
        elif attr in module._parameters:
            old = module._parameters[attr]
            trainable = old.requires_grad and not isinstance(module, Linear4bit)
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=trainable)
        elif attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            unexpected.append(name)
        del tensor
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {directory / (gguf or '')} lacks tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    model.eval()
    if unexpected:
        warnings.warn(f"checkpoint tensors with no place in the model were skipped: {unexpected[:6]}", stacklevel=2)
    model.lorakit_quantization = quantization_settings("nf4", targets, blocksize, double_quant, compute_dtype)
    return model


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """`module` (Linear or Conv1D) viewed with a real weight, for `Linear4bit.from_linear`."""
    from .. import base_layers

    if base_layers.is_conv1d(module):
        holder = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.T, requires_grad=False)
    else:
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight, requires_grad=False)
    holder.bias = module.bias if getattr(module, "bias", None) is not None and not module.bias.is_meta else None
    return holder
