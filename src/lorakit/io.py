"""Saving and loading adapters in Hugging Face PEFT's file layout, safetensors only.

A saved adapter is a directory with

- `adapter_model.safetensors`: tensors named as PEFT names them,
  `base_model.model.<module>.lora_A.weight`, ...; plus full weights of `train_modules`
  (`base_model.model.<module>.<param>`, PEFT's `modules_to_save`);
- `adapter_config.json`: PEFT's config, so `peft.PeftModel.from_pretrained` reads the adapter
  (written for methods PEFT implements);
- `lorakit.json`: lorakit's own config (method, every field) and model-level facts such as
  a quantized base. PEFT ignores this file; lorakit prefers it when present, and otherwise reads
  `adapter_config.json`, so adapters saved by PEFT load too.

Loading is strict: every saved tensor must land on an adapted module and every adapted module
must receive all its tensors, else the error names them. Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import inject
from .base_layers import is_conv1d
from .methods.base import AdapterConfig, config_from_dict, config_from_peft

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
LORAKIT_CONFIG_NAME = "lorakit.json"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds, under PEFT's names."""
    config = inject.adapter_config(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in inject.adapted_layers(model):
        for key, tensor in layer.adapter.peft_state_dict().items():
            state[f"{PREFIX}{name}.{key}"] = tensor
    for module_name in config.train_modules:
        for key, tensor in model.get_submodule(module_name).state_dict().items():
            state[f"{PREFIX}{module_name}.{key}"] = tensor
    extra = getattr(config, "extra_state", None)
    if callable(extra):
        state.update(extra(model))
    return state


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write_bytes(path, write)


def save(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Save the adapter of `model` to `directory` (PEFT layout; see module docstring)."""
    config = inject.adapter_config(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    # Shared adapters appear under several names: safetensors refuses shared storage, so copy.
    seen: set[int] = set()
    for key, tensor in state.items():
        if tensor.untyped_storage().data_ptr() in seen:
            state[key] = tensor.clone()
        seen.add(state[key].untyped_storage().data_ptr())
    _atomic_write_bytes(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    names = [name for name, _ in inject.adapted_layers(model)]
    if config.peft_type is not None:
        peft_config = config.to_peft(names)
        peft_config["base_model_name_or_path"] = base_model_name_or_path
        if "fan_in_fan_out" in peft_config:  # PEFT's flag for GPT-2 Conv1D bases
            peft_config["fan_in_fan_out"] = any(is_conv1d(layer.base_layer) for _, layer in inject.adapted_layers(model))
        _write_json(out / PEFT_CONFIG_NAME, peft_config)
    meta = {"config": config.to_dict(), "adapted_modules": names}
    quantization = getattr(model, "lorakit_quantization", None)
    if quantization is not None:
        meta["quantization"] = quantization
    _write_json(out / LORAKIT_CONFIG_NAME, meta)
    return out


def read_config(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """The adapter's config and lorakit's metadata (empty for adapters saved by PEFT)."""
    path = Path(directory)
    if (path / LORAKIT_CONFIG_NAME).is_file():
        meta = json.loads((path / LORAKIT_CONFIG_NAME).read_text())
        config = config_from_dict(meta["config"])
        # Re-select exactly the modules that were adapted, whatever selection made them.
        config.targets, config.layers, config.exclude = list(meta["adapted_modules"]), None, None
        return config, meta
    if (path / PEFT_CONFIG_NAME).is_file():
        return config_from_peft(json.loads((path / PEFT_CONFIG_NAME).read_text())), {}
    raise FileNotFoundError(f"{path} holds no adapter: neither {LORAKIT_CONFIG_NAME} nor {PEFT_CONFIG_NAME} found")


def load(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Adapt `model` as the saved adapter in `directory` says and load its tensors, strictly.

    Reads adapters saved by lorakit or by Hugging Face PEFT. With `trainable=False` (the
    default, for inference) no parameter requires grad; `trainable=True` resumes training.
    """
    path = Path(directory)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (lorakit reads safetensors only; it never unpickles .bin files)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    config, meta = read_config(path)
    if meta.get("quantization"):
        from .quant import quantize  # imported lazily: only quantized adapters need it

        _check_same_quantization(getattr(model, "lorakit_quantization", None), meta["quantization"], path)
        quantize(model, **meta["quantization"])
    if getattr(config, "init", "default") != "default":
        # the saved tensors replace any initialisation; LoftQ's would need the full-precision base
        inject.adapt(model, dataclasses.replace(config, init="default"))
        model.lorakit_config = config
    else:
        inject.adapt(model, config)
    saved = load_file(str(weights))
    load_adapter_state(model, saved)
    for _, p in inject.adapter_parameters(model):
        p.requires_grad_(trainable)
    return model


def _check_same_quantization(model_settings: dict | None, saved: dict, path: Path) -> None:
    """An already 4-bit base must hold the bits the adapter was trained on (the matmul dtype may differ)."""
    if model_settings is None:
        return
    differ = {k: (model_settings.get(k), saved.get(k)) for k in set(model_settings) | set(saved)
              if k != "compute_dtype" and model_settings.get(k) != saved.get(k)}
    if differ:
        detail = ", ".join(f"{k}: model {a!r} vs adapter {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"the model is quantized differently from the base {path} was trained on ({detail})")


def load_adapter_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors (PEFT names) into an adapted model; every tensor must be used."""
    config = inject.adapter_config(model)
    remaining = dict(saved)
    problems: list[str] = []
    for name, layer in inject.adapted_layers(model):
        prefix = f"{PREFIX}{name}."
        expected = layer.adapter.peft_state_dict()
        mine = {k: remaining.pop(prefix + k) for k in expected if prefix + k in remaining}
        missing = [k for k in expected if k not in mine]
        if missing:
            problems.append(f"{name}: missing {missing}")
            continue
        try:
            layer.adapter.load_peft_state_dict(mine)
        except (KeyError, ValueError) as err:
            problems.append(f"{name}: {err}")
    for module_name in config.train_modules:
        module = model.get_submodule(module_name)
        prefix = f"{PREFIX}{module_name}."
        mine = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
        try:
            _load_module_strict(module, mine)
        except ValueError as err:
            problems.append(f"{module_name}: {err}")
    load_extra = getattr(config, "load_extra_state", None)
    if callable(load_extra):
        load_extra(model, remaining)  # pops what it uses
    if remaining:
        unused = sorted(remaining)
        problems.append(
            f"{len(unused)} saved tensor(s) match no adapted module: {unused[:6]}{' ...' if len(unused) > 6 else ''}"
        )
    if problems:
        raise ValueError("adapter does not fit this model:\n  " + "\n  ".join(problems))


def _load_module_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: saved shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    module.load_state_dict(state)
