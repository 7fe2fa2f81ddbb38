"""Sharded checkpoints of a ROSA run under FSDP2, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes and reads only its own shards of the model and optimizer state; each layer's
resample count (which fixes its next subspace draw) is a buffer of the model's state dict. Besides
those, a checkpoint records which factors had optimizer state (a resample clears it; DCP's loader
would otherwise fill it with freshly initialized state). Both calls are collective.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .model import factor_parameters
from .optimizer_state import base_optimizer

PathLike = Union[str, os.PathLike]
ROSA_KEY = "rosa"


def _rosa_state(model: nn.Module, optimizer: Optional[Any]) -> dict[str, torch.Tensor]:
    state = base_optimizer(optimizer).state if optimizer is not None else {}
    return {"factor_has_state": torch.tensor([p in state for p in factor_parameters(model)])}


def _optimizers(optimizer: Optional[Any]) -> list:
    return [] if optimizer is None else [base_optimizer(optimizer)]


def save_sharded_checkpoint(directory: PathLike, model: nn.Module, optimizer: Optional[Any] = None) -> None:
    """Write ``model``'s and ``optimizer``'s sharded state (resample counts included) to ``directory`` (DCP)."""
    optimizers = _optimizers(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, ROSA_KEY: _rosa_state(model, optimizer)}
    if optimizers:
        state["optimizer"] = optimizer_state
    dcp.save(state, checkpoint_id=os.fspath(directory))


def load_sharded_checkpoint(directory: PathLike, model: nn.Module, optimizer: Optional[Any] = None) -> None:
    """Restore what :func:`save_sharded_checkpoint` wrote into the same (wrapped, sharded) ``model`` and ``optimizer``.

    Raises ``ValueError`` before changing anything when the checkpoint's ROSA layers do not match the model's.
    """
    directory = os.fspath(directory)
    saved = _rosa_state(model, None)
    dcp.load({ROSA_KEY: saved}, checkpoint_id=directory)
    factors = factor_parameters(model)
    if len(saved["factor_has_state"]) != len(factors):
        raise ValueError(f"checkpoint {directory} holds {len(saved['factor_has_state']) // 2} ROSA layers, the "
                         f"model {len(factors) // 2}; wrap the model with the RosaConfig it was saved with")
    optimizers = _optimizers(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizers)  # initializes the optimizer's state
    state = {"model": model_state}
    if optimizers:
        names = {id(p): name for name, p in model.named_parameters()}
        for param, had in zip(factors, saved["factor_has_state"].tolist()):
            if not had:
                optimizer_state["state"].pop(names[id(param)].removeprefix("module."), None)
        state["optimizer"] = optimizer_state
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))
