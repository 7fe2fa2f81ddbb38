"""Integrations with the Hugging Face stack (needs ``transformers``: ``pip install 'rosa-peft[hf]'``)."""

from .trainer import RosaCallback

__all__ = ["RosaCallback"]
