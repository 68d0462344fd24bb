"""`lorakit export --format gguf`: an adapter (or base + adapter merged) as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LorakitError
from .adapters import adapter_dir_and_config, load_adapted
from .outputs import check_output_file, model_inputs


def cmd_export(args: argparse.Namespace) -> int:
    from .. import gguf_export, inject, models

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    if cfg.task != "causal-lm":
        raise LorakitError(
            f"GGUF export is for causal language models (what llama.cpp runs); this run's task is {cfg.task}"
        )
    outtypes = gguf_export.MERGED_OUTTYPES if args.merged else gguf_export.ADAPTER_OUTTYPES
    outtype = args.outtype or ("f16" if args.merged else "f32")
    if outtype not in outtypes:
        raise LorakitError(
            f"--outtype {outtype} is not available {'for a merged model' if args.merged else 'for an adapter'}: "
            f"choose {', '.join(outtypes)}" + ("" if args.merged else " (or --merged)")
        )
    try:
        model_dir, gguf_file = models.resolve_model_path(model_spec, cfg.task)
    except (FileNotFoundError, ValueError) as err:
        raise LorakitError(str(err)) from None
    run = adapter.parent if adapter.name == "adapter" else adapter
    out = Path(args.out) if args.out else run / (f"merged-{outtype}.gguf" if args.merged else "adapter.gguf")
    out = check_export_target(out, adapter, model_spec, cfg.task, args.overwrite)
    if args.merged:
        gguf_export.require_gguf_base(model_dir / gguf_file if gguf_file else None)  # before the model loads
    model, _ = load_adapted(model_spec, adapter, cfg.task)
    layout = gguf_export.gguf_layout(model, model_dir, gguf_file)
    if not args.merged:
        summary = gguf_export.export_adapter(model, layout, out, outtype, description=f"lorakit adapter {run.name}")
        if inject.lorakit_state(model).quantization is not None:
            summary.notes.append(
                "trained on the 4-bit (NF4) base: llama.cpp applies it to the base file's own weights; "
                "--merged writes the weights it was trained against"
            )
    else:
        method = type(inject.adapter_config(model)).__name__
        quantized = inject.lorakit_state(model).quantization is not None
        adapted = sum(1 for _ in inject.adapted_layers(model))
        try:
            inject.merge_and_unload(model)
        except ValueError as err:  # e.g. an adapter on a tied output head
            raise LorakitError(str(err)) from None
        notes = [
            f"{method}: {adapted} adapted weights merged; the other weights as lorakit ran them; "
            f"tokenizer and metadata from {layout.base_file.name}"
        ]
        if quantized:
            notes.append(
                "QLoRA: merged into the dequantized 4-bit (NF4) base weights it was trained against, "
                "not the base file's original weights"
            )
        summary = gguf_export.export_merged(model, layout, out, outtype, notes)
    for line in summary.lines():
        print(line)
    return 0


def check_export_target(out: Path, adapter: Path, model_spec: str | None, task: str, overwrite: bool) -> Path:
    """`--out` must be a file path that is none of the export's inputs (the base model's files, the
    adapter's); an existing file only with --overwrite (`outputs.check_output_file`)."""
    return check_output_file(
        out, "--out", overwrite, inputs=[*model_inputs(model_spec, task), ("the adapter's own directory", adapter)]
    )
