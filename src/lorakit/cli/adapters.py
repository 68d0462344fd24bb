"""What `eval`, `generate`, `inspect`, `merge` and `export` share: a base model with saved adapters
loaded onto it, found from `--adapter` (an adapter directory or a run directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LorakitError
from ..train import config as config_mod
from ..train.config import TrainConfig


def adapter_dir_and_config(adapter: str | None) -> tuple[Path | None, TrainConfig]:
    """The adapter directory for `--adapter` (an adapter or a run directory) and the run's config
    (defaults when the adapter was not written by `lorakit train`)."""
    if adapter is None:
        return None, TrainConfig()
    if not adapter.strip():  # Path("") is the current directory
        raise LorakitError("the adapter path is empty; give an adapter or run directory (runs/<name>)")
    path = Path(adapter)
    if not path.exists():
        raise LorakitError(f"adapter path {path} does not exist")
    run_dir = path
    if (path / "adapter").is_dir():
        path = path / "adapter"
    elif (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        raise LorakitError(
            f"{path} has no adapter/ yet (the run did not finish): `lorakit train --resume {path}` finishes it"
        )
    else:
        run_dir = path.parent
    cfg = TrainConfig()
    if (run_dir / "config.yaml").is_file():
        cfg = config_mod.from_dict(config_mod.load_yaml(run_dir / "config.yaml"))
    return path, cfg


def chosen_task(given: str | None, cfg: TrainConfig, adapter: Path | None) -> str:
    """The task a command loads the model for: `--task`, else the run's. A `--task` other than the one
    the run trained is a warning (not an error: a user may mean it), since the model then gets an
    output head the adapter never trained with."""
    if given is not None and adapter is not None and (adapter.parent / "config.yaml").is_file() and given != cfg.task:
        print(
            f"warning: {adapter.parent} trained a {cfg.task} model; --task {given} loads the base as a {given} model, "
            "with an output head this adapter was not trained with",
            file=sys.stderr,
        )
    return given or cfg.task


def load_adapted(
    model_spec: str | None,
    adapter: Path | None,
    task: str,
    num_labels: int = 2,
    extra: dict[str, Path] | None = None,
    before_load=None,
):
    """(model, tokenizer): the base model with the adapter loaded for inference (and the `extra`
    adapters, name -> directory, beside it on the same base). `before_load(model)` runs on the base
    just before the adapters load (inspect takes its snapshot there)."""
    from .. import io
    from ..train.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec, task)
    quantization = None
    first = adapter if adapter is not None else next(iter((extra or {}).values()), None)
    if first is not None and (first / io.LORAKIT_CONFIG_NAME).is_file():
        try:
            _, meta = io.read_config(first)  # a QLoRA adapter: stream the base into 4 bits directly
        except (ValueError, KeyError) as err:
            raise LorakitError(f"cannot load adapter {first}: {' '.join(str(err).split())}") from None
        quantization = meta.get("quantization")
    model = load_model(model_spec, task, num_labels, tokenizer, quantization)
    if before_load is not None:
        before_load(model)
    named = {None: adapter} if adapter is not None else {}
    named.update(extra or {})
    for name, path in named.items():
        warn_if_other_base(path, model_spec, task)
        try:
            io.load(model, path, name=name) if name is not None else io.load(model, path)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise LorakitError(f"cannot load adapter {path}: {' '.join(str(err).split())}") from None
    model.eval()
    return model, tokenizer


def warn_if_other_base(adapter: Path, model_spec: str | None, task: str) -> None:
    """A warning (not an error: a moved or renamed base is fine) when the adapter records another base."""
    from .. import io, models

    recorded = io.recorded_base(adapter)
    loading = model_spec or (models.DEFAULT_ENCODER if task in ("classify", "regress") else models.DEFAULT_CAUSAL_LM)
    if recorded is None:
        return
    same = recorded == loading or (
        Path(recorded).exists() and Path(loading).exists() and Path(recorded).resolve() == Path(loading).resolve()
    )
    if not same:
        print(f"warning: {adapter} was trained on {recorded}; loading it onto {loading}", file=sys.stderr)


def named_adapters(specs: list[str]) -> dict[str, Path]:
    """`--adapter` values (`PATH` or `NAME=PATH`, an adapter or run directory) -> name -> adapter
    directory. A bare PATH is named after its run (the directory's name)."""
    from ..inject import BASE_NAME, check_name

    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        directory, _ = adapter_dir_and_config(path)
        if not name:
            run = directory.parent if directory.name == "adapter" else directory
            name = run.name.replace(".", "_") or "default"
        try:
            check_name(name)
        except ValueError as err:
            raise LorakitError(f"--adapter {spec}: {err} (write NAME=PATH)") from None
        if name in named or name == BASE_NAME:
            raise LorakitError(f"--adapter {spec}: the name {name!r} is taken; write NAME=PATH with another name")
        named[name] = directory
    return named


def trained_labels(adapter: Path | None) -> list[str]:
    """The class names a classifier was trained with (its run's report), in index order."""
    import json

    if adapter is None or not (adapter.parent / "report.json").is_file():
        return []
    try:
        labels = json.loads((adapter.parent / "report.json").read_text()).get("labels", [])
    except (ValueError, AttributeError):
        raise LorakitError(f"{adapter.parent / 'report.json'} is not valid JSON") from None
    return labels if isinstance(labels, list) and all(isinstance(x, str) for x in labels) else []


def base_weight_snapshot(config, adapter: Path, model_spec: str | None, original: dict):
    """A `load_adapted(before_load=...)` callback that copies the adapted modules' base weights into
    `original` before the adapter loads (Delta-LoRA's file moves the base weights themselves)."""

    def snapshot(model) -> None:
        from .. import analysis, inject

        try:
            names = inject.select_targets(model, config)
        except ValueError as err:
            raise LorakitError(
                f"{adapter} does not fit {model_spec or 'the built-in model'}: {' '.join(str(err).split())}"
            ) from None
        original.update(analysis.snapshot_base_weights(model, names))

    return snapshot
