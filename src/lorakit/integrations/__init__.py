"""lorakit inside the trainers people already use: transformers' `Trainer`, TRL's trainers, Accelerate.

    import lorakit
    from lorakit.integrations import LorakitCallback

    model = lorakit.adapt(model, lorakit.LoRA(r=16, targets="all-linear"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[LorakitCallback()])

For exact resume, LoRA+ and LoRA-drop, which act where no callback runs, build the trainer with
`lorakit_trainer(SFTTrainer)(...)` (it adds the callback itself). See docs/trainer-integration.md.
transformers is the only package this imports; TRL and Accelerate are yours to bring.
"""

from .callback import AdapterSavePretrained, LorakitCallback
from .checkpoints import restore_checkpoint, save_training_state
from .trainer import LorakitTrainerMixin, lorakit_trainer

__all__ = [
    "AdapterSavePretrained",
    "LorakitCallback",
    "LorakitTrainerMixin",
    "lorakit_trainer",
    "restore_checkpoint",
    "save_training_state",
]
