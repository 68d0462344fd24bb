"""The methods. Importing this package registers every method by name (see `base.METHODS`)."""

from .base import METHODS, Adapter, AdapterConfig, register
from .lora import LoRA

__all__ = ["METHODS", "Adapter", "AdapterConfig", "register", "LoRA"]
