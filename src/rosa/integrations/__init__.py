"""Integrations with the Hugging Face stack (needs ``transformers``: ``pip install 'rosa-peft[hf]'``)."""

from .export import export_lora
from .trainer import RosaCallback

__all__ = ["RosaCallback", "export_lora"]
