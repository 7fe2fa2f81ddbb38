"""Multi-process training: checking that ranks agree, and refusing wrappers ROSA cannot work under.

ROSA needs no communication of its own: every rank draws the same subspace from
``(seed, layer name, resample count)``, and ``rosa.resample`` changes factor values in place, so DDP
keeps its parameters and buckets. :func:`check_rank_agreement` verifies that the ranks really hold
bitwise-identical ROSA layers. FSDP2 (``fully_shard``, DTensor parameters) is handled by
:mod:`rosa.sharded`; FSDP1 and DeepSpeed ZeRO-3 hide the full weights from ROSA, and
:func:`check_wrappers` refuses them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .sharded import full, is_sharded

_DIGEST_WORDS = 4  # a SHA-256 digest as four int64 words

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


# -- rank agreement ------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def layer_digest(name: str, layer: nn.Module) -> list[int]:
    """SHA-256 of a ROSA layer's name, residual weight, bias and factors (four int64 words), plus its resample count."""
    digest = hashlib.sha256(name.encode())
    for tensor in (layer.base.weight, getattr(layer.base, "bias", None), layer.up, layer.down):  # embeddings: no bias
        if tensor is not None:
            tensor = full(tensor)
            digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(_tensor_bytes(tensor))
    words = [int.from_bytes(digest.digest()[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]
    return words + [layer.resample_count]


def _gather(local: torch.Tensor, group: Any) -> list[torch.Tensor]:
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return gathered


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_rank_agreement(model: nn.Module, group: Optional[Any] = None) -> int:
    """Raise ``RuntimeError`` unless every rank of ``group`` holds bitwise-identical ROSA layers.

    Compares, per layer, a SHA-256 of the residual weight, bias and factors (all-gathered under
    FSDP2), and the resample count. Collective: every rank of ``group`` must call it (each raises the same error). Outside
    an initialized process group it checks nothing. Returns the number of layers compared.
    """
    from .model import rosa_layers

    layers = rosa_layers(model)
    if not (dist.is_available() and dist.is_initialized()):
        return len(layers)
    device = _collective_device(group)
    counts = _gather(torch.tensor([len(layers)], device=device), group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(f"ranks hold different numbers of ROSA layers: {[int(c) for c in counts]} (by rank)")
    local = torch.tensor([layer_digest(n, layer) for n, layer in layers.items()], dtype=torch.int64, device=device)
    gathered = _gather(local.reshape(len(layers), _DIGEST_WORDS + 1), group)
    _raise_on_disagreement(list(layers), [g.cpu() for g in gathered])
    return len(layers)


def _raise_on_disagreement(names: list[str], gathered: list[torch.Tensor]) -> None:
    reference = gathered[0]
    for index, name in enumerate(names):
        differing = [rank for rank, g in enumerate(gathered) if not torch.equal(g[index], reference[index])]
        if differing:
            counts = [int(g[index, _DIGEST_WORDS]) for g in gathered]
            raise RuntimeError(
                f"ROSA layer {name!r} differs between rank 0 and rank(s) {differing} "
                f"(resample counts by rank: {counts}). Ranks must build the same model with the same "
                "RosaConfig.seed, wrap it before DistributedDataParallel, and call rosa.resample on every "
                "rank at the same step."
            )


# -- unsupported wrappers ------------------------------------------------------------------------
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
