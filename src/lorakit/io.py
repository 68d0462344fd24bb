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

Several named adapters follow PEFT's layout too: "default" in the directory itself, every other
in a sub-directory named after it, each a complete adapter directory of its own (PEFT's
`load_adapter(path/name, adapter_name=name)` reads each; `lorakit.load(model, path)` reads them all).

Loading is strict: every saved tensor must land on an adapted module and every adapted module
must receive all its tensors, else the error names them, and nothing half-loaded stays on the
model. `hotswap` replaces an existing adapter's weights in place. Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import files, inject
from .base_layers import is_conv1d
from .errors import LorakitError
from .methods.base import AdapterConfig, config_from_dict, config_from_peft

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
LORAKIT_CONFIG_NAME = "lorakit.json"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor the file of adapter `name` holds, under PEFT's names."""
    config = inject.adapter_config(model, name)
    state: dict[str, torch.Tensor] = {}
    for module_name, adapter in unique_adapters(model, name):  # a shared adapter is written once
        for key, tensor in adapter.peft_state_dict().items():
            state[f"{PREFIX}{module_name}.{key}"] = tensor
    for module_name in config.train_modules:
        for key, tensor in model.get_submodule(module_name).state_dict().items():
            state[f"{PREFIX}{module_name}.{key}"] = tensor
    state.update(config.extra_state(model, name))
    return state


def unique_adapters(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(first module using it, adapter) for each distinct adapter object of `name`: an adapter shared
    by several modules (LoRA-drop's shared pairs) is stored under the first of them only."""
    seen: set[int] = set()
    out = []
    for module_name, layer in inject.adapted_layers(model, name):
        adapter = layer.adapters[name]
        if id(adapter) not in seen:
            seen.add(id(adapter))
            out.append((module_name, adapter))
    return out


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file beside `path` (synced, then renamed over it: `files.atomic_write`);
    what a killed earlier save left beside it is removed first."""
    files.clean_temporaries(path.parent, path.name)
    files.atomic_write(path, lambda tmp: write(str(tmp)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write_bytes(path, write)


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    names: str | list[str] | None = None,
) -> Path:
    """Save adapters of `model` under `directory` in PEFT's layout (see module docstring).

    `names`: which adapters (default: all). The one named "default" goes to `directory` itself,
    every other into `directory/<name>/`, as PEFT's `save_pretrained` lays them out.
    """
    state = inject.lorakit_state(model)
    all_names = inject.adapter_names(model)
    if not all_names:
        inject.adapter_config(model)  # the usual "no adapter" error
    names = all_names if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ValueError(f"no adapter named {unknown} on this model; adapters: {all_names}")
    out = Path(directory)
    for name in names:
        target = out if name == inject.DEFAULT_NAME else out / name
        _save_one(model, name, target, base_model_name_or_path, state.quantization)
    return out


def _save_one(model: nn.Module, name: str, out: Path, base_model_name_or_path: str | None, quantization) -> None:
    config = inject.adapter_config(model, name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LorakitError(
            f"cannot save the adapter to {out}: a file is there; an adapter is a directory (give "
            "a new or existing directory)"
        ) from None
    except OSError as err:
        raise LorakitError(
            f"cannot save the adapter to {out}: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename and str(err.filename) != str(out) else "")
        ) from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
    # Shared adapters appear under several names: safetensors refuses shared storage, so copy.
    seen: set[int] = set()
    for key, tensor in state.items():
        if tensor.untyped_storage().data_ptr() in seen:
            state[key] = tensor.clone()
        seen.add(state[key].untyped_storage().data_ptr())
    _atomic_write_bytes(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    layers = list(inject.adapted_layers(model, name))
    module_names = [module_name for module_name, _ in layers]
    if config.peft_type is not None:
        peft_config = config.to_peft(module_names)
        peft_config["base_model_name_or_path"] = base_model_name_or_path
        if "fan_in_fan_out" in peft_config:  # PEFT's flag for GPT-2 Conv1D bases
            peft_config["fan_in_fan_out"] = any(is_conv1d(layer.base_layer) for _, layer in layers)
        _write_json(out / PEFT_CONFIG_NAME, peft_config)
    meta = {
        "config": config.to_dict(),
        "adapted_modules": module_names,
        "adapter_name": name,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if quantization is not None:
        meta["quantization"] = quantization
    _write_json(out / LORAKIT_CONFIG_NAME, meta)


def recorded_base(directory: str | os.PathLike) -> str | None:
    """The base model the adapter in `directory` was trained on, as recorded (lorakit's or PEFT's file)."""
    path = Path(directory)
    for name in (LORAKIT_CONFIG_NAME, PEFT_CONFIG_NAME):
        if (path / name).is_file():
            try:
                value = json.loads((path / name).read_text()).get("base_model_name_or_path")
            except (ValueError, AttributeError):
                return None
            if isinstance(value, str) and value:
                return value
    return None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a ValueError saying the file is not one (truncated, empty, a
    renamed pickle, ...). Only floating-point tensors are adapter weights: an integer or boolean one
    would be silently converted on load, so it is refused."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())[:200]})") from None
    odd = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if odd:
        raise ValueError(f"{path}: tensors {odd[:4]} are {tensors[odd[0]].dtype}, not floating point")
    return tensors


QUANTIZATION_RECORD_FIELDS = {
    "method": str,
    "targets": (str, list),
    "blocksize": int,
    "double_quant": bool,
    "compute_dtype": (str, type(None)),
    "layers": (list, type(None)),
    "exclude": (list, type(None)),
    "loftq_rank": int,
}


def _check_quantization_record(record: Any) -> None:
    """lorakit.json's `quantization` (the keyword arguments of `lorakit.quantize`), or nothing."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise ValueError(f"'quantization' must be an object of lorakit.quantize settings, got {type(record).__name__}")
    for key, value in record.items():
        if key not in QUANTIZATION_RECORD_FIELDS:
            raise ValueError(
                f"'quantization' has an unknown setting {key!r}; known: {', '.join(QUANTIZATION_RECORD_FIELDS)}"
            )
        if not isinstance(value, QUANTIZATION_RECORD_FIELDS[key]) or (
            isinstance(value, bool) and QUANTIZATION_RECORD_FIELDS[key] is int
        ):
            raise ValueError(f"'quantization.{key}' has the wrong type ({type(value).__name__})")


def read_config(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """The adapter's config and lorakit's metadata (empty for adapters saved by PEFT); a malformed
    file is a ValueError that names it."""
    path = Path(directory)
    for name in (LORAKIT_CONFIG_NAME, PEFT_CONFIG_NAME):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if name == PEFT_CONFIG_NAME:
                return config_from_peft(data), {}
            if (
                not isinstance(data.get("config"), dict)
                or not isinstance(data.get("adapted_modules"), list)
                or not all(isinstance(m, str) for m in data["adapted_modules"])
            ):
                raise ValueError("expected 'config' (an object) and 'adapted_modules' (a list of module names)")
            _check_quantization_record(data.get("quantization"))
            config = config_from_dict(data["config"])
            # Re-select exactly the modules that were adapted, whatever selection made them.
            config.targets, config.layers, config.exclude = list(data["adapted_modules"]), None, None
            return config, data
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            RecursionError,
            UnicodeDecodeError,
            OverflowError,
        ) as err:
            raise ValueError(f"{file} is not a valid adapter config: {' '.join(str(err).split())[:300]}") from None
    raise FileNotFoundError(f"{path} holds no adapter: neither {LORAKIT_CONFIG_NAME} nor {PEFT_CONFIG_NAME} found")


def has_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an adapter file (lorakit's or PEFT's)."""
    path = Path(directory)
    return (path / WEIGHTS_NAME).is_file() and (
        (path / LORAKIT_CONFIG_NAME).is_file() or (path / PEFT_CONFIG_NAME).is_file()
    )


def find_adapters(directory: str | os.PathLike) -> dict[str, Path]:
    """The adapters of a PEFT-layout directory: itself as "default" (when it holds one) and every
    sub-directory holding one, under the sub-directory's name."""
    path = Path(directory)
    found = {inject.DEFAULT_NAME: path} if has_adapter(path) else {}
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name != inject.DEFAULT_NAME):
            if has_adapter(sub):
                found[sub.name] = sub
    return found


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    trainable: bool = False,
    name: str | None = None,
) -> nn.Module:
    """Add the saved adapter(s) in `directory` to `model` and load their tensors, strictly.

    Reads adapters saved by lorakit or by Hugging Face PEFT. With `name`, the adapter stored in
    `directory` itself is added under that name. Without, every adapter of the PEFT layout is
    added: `directory` itself as "default" and each sub-directory holding an adapter under its
    own name. A model that had no active adapter activates the first one loaded ("default" when
    present); otherwise the active set is unchanged (`lorakit.set_active` changes it).
    With `trainable=False` (the default, for inference) no loaded parameter requires grad;
    `trainable=True` resumes training.
    """
    path = Path(directory)
    if name is not None:
        found = {name: path}
    else:
        found = find_adapters(path)
        if not found:
            _require_weights(path)  # names what is missing
            raise FileNotFoundError(
                f"{path} holds no adapter: neither {LORAKIT_CONFIG_NAME} nor {PEFT_CONFIG_NAME} found"
            )
    state = inject.lorakit_state(model)
    active_before = state.active if state is not None else ()
    loaded: list[str] = []
    try:
        for adapter_name, adapter_path in found.items():
            _load_one(model, adapter_path, adapter_name, trainable)
            loaded.append(adapter_name)
    except BaseException:
        for adapter_name in loaded:  # all or nothing
            inject.remove(model, adapter_name)
        if active_before:
            inject.set_active(model, active_before)
        raise
    inject.set_active(model, active_before or [next(iter(found))])
    return model


def _require_weights(path: Path) -> Path:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = (
            " (lorakit reads safetensors only; it never unpickles .bin files)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"{weights} not found{hint}")
    return weights


def _load_one(model: nn.Module, path: Path, name: str, trainable: bool) -> None:
    weights = _require_weights(path)
    config, meta = read_config(path)
    state = inject.lorakit_state(model)
    if meta.get("quantization"):
        from .quant import quantize  # imported lazily: only quantized adapters need it

        if state is not None and state.quantization is not None:
            _check_same_quantization(state.quantization, meta["quantization"], path)
        else:
            quantize(model, **meta["quantization"])
    saved = read_tensors(weights)
    adapt_as_saved(model, config, name)
    try:
        load_adapter_state(model, saved, name)
    except BaseException:
        inject.remove(model, name)  # nothing half-loaded stays on the model
        raise
    for _, p in list(inject.adapter_parameters(model)):  # after adapt: this adapter (+ train_modules)
        p.requires_grad_(trainable)


def adapt_as_saved(model: nn.Module, config: AdapterConfig, name: str = inject.DEFAULT_NAME) -> nn.Module:
    """Adapt `model` with a saved adapter's config, ready for its tensors: with the default start
    (saved tensors replace any initialisation; LoftQ's would need the full-precision base), the
    saved config (its `init` included) recorded as the adapter's."""
    if getattr(config, "init", "default") != "default":
        inject.adapt(model, dataclasses.replace(config, init="default"), name)
        inject.lorakit_state(model).configs[name] = config
    else:
        inject.adapt(model, config, name)
    return model


def hotswap(model: nn.Module, directory: str | os.PathLike, name: str = inject.DEFAULT_NAME) -> nn.Module:
    """Replace the weights of the existing adapter `name` by those saved in `directory`, in place.

    Nothing is re-wrapped and no tensor is re-allocated, so a `torch.compile`d model keeps its
    compiled code (serving: one base, many task adapters). The saved adapter must have the same
    method, modules, ranks and scales; what differs is named.
    """
    path = Path(directory)
    weights = _require_weights(path)
    config, _ = read_config(path)
    current = inject.adapter_config(model, name)
    modules = [m for m, _ in inject.adapted_layers(model, name)]
    problems = []
    if type(config) is not type(current):
        problems.append(f"method {config.method!r} vs the model's {current.method!r}")
    elif sorted(inject.select_targets(model, config)) != sorted(modules):
        saved_modules = set(inject.select_targets(model, config))
        problems.append(
            f"adapted modules differ (only saved: {sorted(saved_modules - set(modules))[:4]}, "
            f"only in the model: {sorted(set(modules) - saved_modules)[:4]})"
        )
    else:
        for module_name in modules:
            if config.module_settings(module_name) != current.module_settings(module_name):
                problems.append(
                    f"{module_name}: {config.module_settings(module_name)} vs the model's "
                    f"{current.module_settings(module_name)}"
                )
        differ = [f for f in ("alpha", "rslora", "dropout") if getattr(config, f, None) != getattr(current, f, None)]
        if differ:
            problems.append(
                "fields " + ", ".join(f"{f}: {getattr(config, f)!r} vs {getattr(current, f)!r}" for f in differ)
            )
    if problems:
        raise ValueError(f"cannot hot-swap {path} into adapter {name!r}: " + "; ".join(problems[:6]))
    load_adapter_state(model, read_tensors(weights), name)
    return model


def _check_same_quantization(model_settings: dict, saved: dict, path: Path) -> None:
    """An already 4-bit base must hold the bits the adapter was trained on (the matmul dtype may differ)."""
    differ = {
        k: (model_settings.get(k), saved.get(k))
        for k in set(model_settings) | set(saved)
        if k != "compute_dtype" and model_settings.get(k) != saved.get(k)
    }
    if differ:
        detail = ", ".join(f"{k}: model {a!r} vs adapter {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"the model is quantized differently from the base {path} was trained on ({detail})")


def load_adapter_state(model: nn.Module, saved: dict[str, torch.Tensor], name: str = inject.DEFAULT_NAME) -> None:
    """Copy saved tensors (PEFT names) into adapter `name`, in place; every tensor must be used."""
    config = inject.adapter_config(model, name)
    remaining = dict(saved)
    problems: list[str] = []
    for module_name, adapter in unique_adapters(model, name):
        prefix = f"{PREFIX}{module_name}."
        expected = adapter.peft_state_dict()
        mine = {k: remaining.pop(prefix + k) for k in expected if prefix + k in remaining}
        missing = [k for k in expected if k not in mine]
        if missing:
            problems.append(f"{module_name}: missing {missing}")
            continue
        try:
            adapter.load_peft_state_dict(mine)
        except (KeyError, ValueError) as err:
            problems.append(f"{module_name}: {err}")
    for module_name in config.train_modules:
        module = model.get_submodule(module_name)
        prefix = f"{PREFIX}{module_name}."
        mine = {k[len(prefix) :]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
        try:
            _load_module_strict(module, mine)
        except ValueError as err:
            problems.append(f"{module_name}: {err}")
    try:
        config.load_extra_state(model, name, remaining)  # pops what it uses
    except ValueError as err:
        problems.append(str(err))
    if remaining:
        unused = sorted(remaining)
        problems.append(
            f"{len(unused)} saved tensor(s) match no adapted module: {unused[:6]}{' ...' if len(unused) > 6 else ''}"
        )
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError("adapter does not fit this model: " + "; ".join(shown))


def _load_module_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: saved shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    module.load_state_dict(state)
