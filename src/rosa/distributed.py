"""Multi-process training: checking that the ranks hold bitwise-identical ROSA layers.

ROSA needs no communication of its own: every rank draws the same subspace from
``(seed, layer name, resample count)``, and ``rosa.resample`` changes factor values in place, so DDP
keeps its parameters and buckets. :func:`check_rank_agreement` verifies that the ranks really hold
bitwise-identical ROSA layers; :func:`rosa.ranks.check_same_on_ranks` is the cheap check ``rosa.wrap``
and ``rosa.resample`` run on every rank (same config, layers and resample counts). FSDP2
(``fully_shard``) is handled by :mod:`rosa.sharded`; :mod:`rosa.wrappers` refuses FSDP1 and DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .model import rosa_layers
from .ranks import DIGEST_WORDS, collective_device, digest_words, gather, update_digest
from .sharded import full


def layer_digest(name: str, layer: nn.Module) -> list[int]:
    """SHA-256 of a ROSA layer's name, residual weight, bias and factors (four int64 words), plus its resample count."""
    digest = hashlib.sha256(name.encode())
    bias = getattr(layer.base, "bias", None)  # embeddings have none
    for tensor in (layer.base.weight, bias, layer.up, layer.down):
        if tensor is not None:
            update_digest(digest, full(tensor))
    return digest_words(digest) + [layer.resample_count]


def check_rank_agreement(model: nn.Module, group: Optional[Any] = None) -> int:
    """Raise ``RuntimeError`` unless every rank of ``group`` holds bitwise-identical ROSA layers.

    Compares, per layer, a SHA-256 of the residual weight, bias and factors (all-gathered under
    FSDP2), and the resample count. Collective: every rank of ``group`` must call it (each raises the same error). Outside
    an initialized process group it checks nothing. Returns the number of layers compared.
    """
    layers = rosa_layers(model)
    if not (dist.is_available() and dist.is_initialized()):
        return len(layers)
    device = collective_device(group)
    counts = gather(torch.tensor([len(layers)], device=device), group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(f"ranks hold different numbers of ROSA layers: {[int(c) for c in counts]} (by rank)")
    local = torch.tensor([layer_digest(n, layer) for n, layer in layers.items()], dtype=torch.int64, device=device)
    gathered = gather(local.reshape(len(layers), DIGEST_WORDS + 1), group)
    _raise_on_disagreement(list(layers), [g.cpu() for g in gathered])
    return len(layers)


def _raise_on_disagreement(names: list[str], gathered: list[torch.Tensor]) -> None:
    reference = gathered[0]
    for index, name in enumerate(names):
        differing = [rank for rank, g in enumerate(gathered) if not torch.equal(g[index], reference[index])]
        if differing:
            counts = [int(g[index, DIGEST_WORDS]) for g in gathered]
            raise RuntimeError(
                f"ROSA layer {name!r} differs between rank 0 and rank(s) {differing} "
                f"(resample counts by rank: {counts}). Ranks must build the same model with the same "
                "RosaConfig.seed, wrap it before DistributedDataParallel, and call rosa.resample on every "
                "rank at the same step."
            )
