"""Tiny Trainer runs shared by the trainer-integration tests and the `accelerate launch` script.

Run as a script (`accelerate launch --num_processes 2 tests/trainer_runs.py OUT BATCH`), it trains a
tiny LoRA with `lorakit_trainer(Trainer)` and writes the final adapter tensors to OUT/final.safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def token_data(n: int = 32, length: int = 12, seed: int = 0):
    """A `datasets.Dataset` of random token rows (labels = inputs), as a tokenized SFT set is."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def method_config(method: str, **overrides) -> lorakit.methods.AdapterConfig:
    """A small config of `method` over TARGETS that acts from the first steps."""
    cls = lorakit.methods.METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"targets": TARGETS}
    if "r" in fields:
        kwargs["r"] = 16 if method == "vera" else 4
    if "start_step" in fields:  # Delta-LoRA moves the base from the first step
        kwargs["start_step"] = 0
    if "init_r" in fields:  # AdaLoRA: prunes from step 2, decides its final ranks 2 steps before the end
        kwargs.update(init_r=4, target_r=2, tinit=1, tfinal=2)
    if "sample_fraction" in fields:  # LoRA-drop: a probe over half the data
        kwargs.update(sample_fraction=0.5, probe_steps=3, threshold=0.6)
    kwargs.update(overrides)
    return cls(**kwargs)


def training_args(out: Path, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything training may change: adapter tensors, and the base weights of adapted modules
    (Delta-LoRA moves them)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." in k or ".base_layer." in k}


def main(out: str, batch: int) -> None:
    """AdaLoRA (hooks) with LoRA+ over `batch` examples per process; records which processes wrote
    adapter files."""
    from lorakit import io

    out_dir = Path(out)
    model = lorakit.adapt(tiny_llama(), method_config("adalora"))
    original_save = io.save

    def recording_save(*args, **kwargs):  # which processes write adapter files
        (out_dir / f"adapter-written-by-rank-{os.environ.get('RANK', '0')}").touch()
        return original_save(*args, **kwargs)

    io.save = recording_save
    try:
        train_and_write(out_dir, model, batch)
    finally:
        io.save = original_save


def train_and_write(out_dir: Path, model: torch.nn.Module, batch: int) -> None:
    from safetensors.torch import save_file
    from transformers import Trainer

    from lorakit.integrations import LorakitCallback, lorakit_trainer

    distributed = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    args = training_args(
        out_dir,
        per_device_train_batch_size=batch,
        save_strategy="steps",
        save_steps=4,
        learning_rate=5e-3,
        **distributed,
    )
    trainer = lorakit_trainer(Trainer)(
        model=model, args=args, train_dataset=token_data(), callbacks=[LorakitCallback(loraplus_ratio=4.0)]
    )
    trainer.train()
    if trainer.is_world_process_zero():
        save_file({k: v.contiguous() for k, v in adapter_tensors(model).items()}, str(out_dir / "final.safetensors"))
        (out_dir / "ranks.txt").write_text(repr(lorakit.inject.adapter_config(model).rank_pattern))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
