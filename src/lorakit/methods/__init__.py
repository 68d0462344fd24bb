"""The methods. Importing this package registers every method by name (see `base.METHODS`)."""

# Registration order matters (config_from_peft takes the first method that reads a PEFT config):
# isort: off
from .base import METHODS, Adapter, AdapterConfig, register
from .lora import LoRA
from .dora import DoRA
from .vera import VeRA
from .lora_fa import LoRAFA
from .delta_lora import DeltaLoRA
from .adalora import AdaLoRA
from .lora_drop import LoRADrop
# isort: on

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "register",
    "LoRA",
    "DoRA",
    "VeRA",
    "LoRAFA",
    "DeltaLoRA",
    "AdaLoRA",
    "LoRADrop",
]
