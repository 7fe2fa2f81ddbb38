"""Refusing model wrappers that ROSA cannot work under: sharded models, and wrapping inside DDP.

Sharded wrappers (FSDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-3) hold only a shard of each weight
on a rank, while factorize, merge and resample need the full weight.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

_SHARDED_HELP = (
    "ROSA's factorize/merge/resample need each layer's full weight, but this model is sharded by {wrapper}, "
    "so a rank only holds a shard. Sharded training is not supported yet. Use DistributedDataParallel "
    "(torchrun / accelerate launch with DDP) if the model fits on one device. Under FSDP, resampling would "
    "have to run inside FullyShardedDataParallel.summon_full_params(model, writeback=True, rank0_only=False) "
    "on every rank and then reset the sharded optimizer state; rosa does not do that for you. "
    "See docs/distributed.md."
)


def _fsdp_class() -> Optional[type]:
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _dtensor_class() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def sharding_wrapper(model: nn.Module) -> Optional[str]:
    """The name of the wrapper that shards ``model``'s weights across ranks, or ``None``."""
    fsdp, dtensor = _fsdp_class(), _dtensor_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return "FullyShardedDataParallel (FSDP)"
    for param in model.parameters():
        if hasattr(param, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if dtensor is not None and isinstance(param, dtensor):
            return "FSDP2 fully_shard / DTensor"
    return None


def check_wrappers(model: nn.Module, operation: str) -> None:
    """Refuse models ``operation`` (``"wrap"``, ``"resample"`` or ``"merge"``) would silently get wrong.

    Raises ``NotImplementedError`` for sharded models (FSDP, FSDP2, DeepSpeed ZeRO-3), and
    ``ValueError`` when asked to wrap a model already inside ``DistributedDataParallel`` (factors
    created after DDP is built would not be synchronized).
    """
    wrapper = sharding_wrapper(model)
    if wrapper is not None:
        raise NotImplementedError(f"rosa.{operation}: " + _SHARDED_HELP.format(wrapper=wrapper))
    if operation == "wrap" and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "rosa.wrap got a DistributedDataParallel model; wrap the plain model first, then build DDP "
            "(DDP only synchronizes parameters that exist when it is constructed)"
        )
