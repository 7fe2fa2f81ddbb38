"""Refusing model wrappers that ROSA cannot work under, and wrapping a model that is already wrapped.

FSDP2 (``fully_shard``, DTensor parameters) resamples and merges through :mod:`rosa.sharded`; FSDP1
and DeepSpeed ZeRO-3 hide the full weights, factors or their optimizer state from ROSA.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .sharded import is_sharded

_SHARDED_HELP = {
    "FullyShardedDataParallel (FSDP)": (
        "FSDP1 flattens parameters into flat buffers, so ROSA cannot reach a layer's residual and factors "
        "or their optimizer state. Shard with FSDP2 instead: rosa.wrap(model, config), then "
        "torch.distributed.fsdp.fully_shard on each block and on the root"
    ),
    "DeepSpeed ZeRO-3": (
        "ZeRO-3 partitions parameters outside PyTorch's view and its optimizer keeps its own fp32 master "
        "copy of them, which would overwrite the factors rosa.resample writes. Use FSDP2 "
        "(torch.distributed.fsdp.fully_shard, or accelerate's FSDP2 plugin) or DistributedDataParallel"
    ),
}


def _fsdp_class() -> Optional[type]:
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def sharding_wrapper(model: nn.Module) -> Optional[str]:
    """The name of the wrapper that shards ``model``'s weights across ranks, or ``None``."""
    fsdp = _fsdp_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return "FullyShardedDataParallel (FSDP)"
    for param in model.parameters():
        if hasattr(param, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if is_sharded(param):
            return "FSDP2 fully_shard / DTensor"
    return None


def check_wrappers(model: nn.Module, operation: str) -> None:
    """Refuse models ``operation`` (``"wrap"``, ``"resample"`` or ``"merge"``) would silently get wrong.

    Raises ``NotImplementedError`` for FSDP1 and DeepSpeed ZeRO-3, and ``ValueError`` when asked to
    wrap a model that is already inside ``DistributedDataParallel`` or sharded by FSDP2 (factors
    created afterwards would be neither synchronized nor sharded). FSDP2 models resample and merge.
    """
    wrapper = sharding_wrapper(model)
    if wrapper in _SHARDED_HELP:
        raise NotImplementedError(f"rosa.{operation}: this model is sharded by {wrapper}. " + _SHARDED_HELP[wrapper]
                                  + ". See docs/distributed.md.")
    if operation == "wrap" and wrapper is not None:
        raise ValueError(
            "rosa.wrap got a model already sharded by FSDP2 (DTensor parameters); wrap the plain model first, "
            "then call fully_shard (FSDP2 only shards parameters that exist when it is applied)"
        )
    if operation == "wrap" and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "rosa.wrap got a DistributedDataParallel model; wrap the plain model first, then build DDP "
            "(DDP only synchronizes parameters that exist when it is constructed)"
        )
