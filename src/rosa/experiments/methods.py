"""Prepare a loaded Hugging Face model for one fine-tuning method: ROSA, PEFT LoRA or full.

ROSA and LoRA adapt exactly the same layers at the same rank: LoRA's targets are ROSA's
resolved targets (``rosa.targets.find_targets``), passed to PEFT as exact module names.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

import rosa
from rosa.config import Patterns
from rosa.layers import conv1d_type
from rosa.targets import find_targets
from rosa.presets import classifier_head  # noqa: F401 (the runners' head choice, re-exported)

METHODS = ("rosa", "lora", "full")


def check_method(method: str) -> str:
    """Return ``method`` if known, else raise ``ValueError`` listing the choices."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def prepare_model(
    model: nn.Module,
    method: str,
    rank: int | float,
    target_modules: Patterns = None,
    selection: str = "random",
    seed: int = 0,
    modules_to_save: Optional[Sequence[str]] = None,
    dropout: float = 0.0,
    lora_alpha: Optional[float] = None,
    singular_values: str = "split",
) -> nn.Module:
    """Make ``model`` ready to train with ``method``; returns the model to train.

    ``rosa``: ``rosa.wrap`` in place. ``lora``: a PEFT ``PeftModel`` on ROSA's targets, same rank,
    ``lora_alpha`` = rank unless given. ``full``: every parameter trainable. ``modules_to_save``
    (e.g. :func:`classifier_head`) are trained fully by ``rosa`` and ``lora``. ``selection`` and
    ``singular_values`` are ROSA's (see :class:`rosa.RosaConfig`).
    """
    check_method(method)
    saved = list(modules_to_save) if modules_to_save else None
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "rosa":
        config = rosa.RosaConfig(
            rank=rank, target_modules=target_modules, selection=selection, seed=seed,
            dropout=dropout, modules_to_save=saved, singular_values=singular_values,
        )
        return rosa.wrap(model, config)
    return _lora(model, rank, target_modules, saved, dropout, lora_alpha)


def _lora(
    model: nn.Module,
    rank: int | float,
    target_modules: Patterns,
    modules_to_save: Optional[list[str]],
    dropout: float,
    lora_alpha: Optional[float],
) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise RuntimeError("the LoRA anchor needs Hugging Face PEFT: pip install 'rosa-peft[hf]'") from err
    if not isinstance(rank, int):
        raise ValueError(f"method 'lora' needs an int rank, got {rank!r}")
    targets = find_targets(model, rosa.RosaConfig(rank=rank, target_modules=target_modules))
    conv1d = conv1d_type()
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        lora_dropout=dropout,
        target_modules=[name for name, _ in targets],
        modules_to_save=modules_to_save,
        fan_in_fan_out=conv1d is not None and all(isinstance(m, conv1d) for _, m in targets),
    )
    return get_peft_model(model, config)


def finalize_model(model: nn.Module, method: str) -> nn.Module:
    """A plain Hugging Face model with the training result folded in (loadable without rosa or peft)."""
    check_method(method)
    if method == "rosa":
        return rosa.merge(model)
    if method == "lora":
        return model.merge_and_unload()
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
