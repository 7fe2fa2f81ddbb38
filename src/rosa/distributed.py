"""Multi-process training: checking that ranks agree, and refusing wrappers ROSA cannot work under.

ROSA needs no communication of its own: every rank draws the same subspace from
``(seed, layer name, resample count)``, and ``rosa.resample`` changes factor values in place, so DDP
keeps its parameters and buckets. :func:`check_rank_agreement` verifies that the ranks really hold
bitwise-identical ROSA layers; :func:`check_same_on_ranks` is the cheap check ``rosa.wrap`` and
``rosa.resample`` run on every rank (same config, layers and resample counts). Sharded wrappers
(FSDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-3) hold only a shard of each weight on a rank;
:func:`check_wrappers` refuses them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

_DIGEST_WORDS = 4  # a SHA-256 digest as four int64 words

_SHARDED_HELP = (
    "ROSA's factorize/merge/resample need each layer's full weight, but this model is sharded by {wrapper}, "
    "so a rank only holds a shard. Sharded training is not supported yet. Use DistributedDataParallel "
    "(torchrun / accelerate launch with DDP) if the model fits on one device. Under FSDP, resampling would "
    "have to run inside FullyShardedDataParallel.summon_full_params(model, writeback=True, rank0_only=False) "
    "on every rank and then reset the sharded optimizer state; rosa does not do that for you. "
    "See docs/distributed.md."
)


# -- rank agreement ------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def _digest_words(digest: "hashlib._Hash") -> list[int]:
    """A SHA-256 digest as ``_DIGEST_WORDS`` signed int64 words."""
    raw = digest.digest()
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, 8 * _DIGEST_WORDS, 8)]


def layer_digest(name: str, layer: nn.Module) -> list[int]:
    """SHA-256 of a ROSA layer's name, residual weight, bias and factors (four int64 words), plus its resample count."""
    digest = hashlib.sha256(name.encode())
    for tensor in (layer.base.weight, layer.base.bias, layer.up, layer.down):
        if tensor is not None:
            digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(_tensor_bytes(tensor))
    return _digest_words(digest) + [layer.resample_count]


def _gather(local: torch.Tensor, group: Any) -> list[torch.Tensor]:
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return gathered


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_on_ranks(fingerprint: str, operation: str, what: str, group: Optional[Any] = None) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks of ``group`` pass the same ``fingerprint``.

    One all-gather of a 32-byte digest. Collective: every rank of ``group`` must call it. Outside an
    initialized process group it checks nothing. ``what`` names what the fingerprint describes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    words = _digest_words(hashlib.sha256(fingerprint.encode()))
    gathered = _gather(torch.tensor(words, dtype=torch.int64, device=_collective_device(group)), group)
    differing = [rank for rank, g in enumerate(gathered) if not torch.equal(g.cpu(), gathered[0].cpu())]
    if differing:
        raise RuntimeError(
            f"{operation}: rank(s) {differing} differ from rank 0 in their {what}. Every rank must build the "
            "same model with the same RosaConfig (seed included), wrap it before DistributedDataParallel and "
            "call rosa.resample on every rank at the same step."
        )


def check_rank_agreement(model: nn.Module, group: Optional[Any] = None) -> int:
    """Raise ``RuntimeError`` unless every rank of ``group`` holds bitwise-identical ROSA layers.

    Compares, per layer, a SHA-256 of the residual weight, bias and factors, and the resample
    count. Collective: every rank of ``group`` must call it (each raises the same error). Outside
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
