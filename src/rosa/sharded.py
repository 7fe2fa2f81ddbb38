"""Sharded parameters (FSDP2 ``fully_shard`` / DTensor) and resampling SVDs split across ranks.

A ROSA layer under FSDP2 holds its residual and factors as DTensors, each rank only a shard. The
layer math reads a parameter through :func:`full` (an all-gather, so every rank must make the same
calls in the same order) and writes it through :func:`assign`, which copies each rank's piece of the
new full value into its local shard in place, so Parameter objects (and the optimizer's references
to them) keep their identity.

:func:`round_robin` spreads independent pieces of work (the batched SVDs of a resample) over the
ranks of the default process group: piece ``i`` is computed by rank ``i % world`` and its result
broadcast, so every rank ends with the owner's bitwise result.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import ranks

Item = TypeVar("Item")
Result = tuple[torch.Tensor, ...]


def _dtensor_class() -> Optional[type]:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 ``fully_shard``, tensor parallelism)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


@torch.no_grad()
def full(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a plain full tensor: DTensors are all-gathered (collective, no autograd graph), others
    returned as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor ``value`` into ``target`` in place; a DTensor ``target`` takes this rank's piece.

    Every rank must pass the same ``value`` for a DTensor ``target``: each keeps only its own piece.
    """
    if not is_sharded(target):
        target.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    target.to_local().copy_(local.to_local())


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (after an evaluation forward, say),
    so that writes through :func:`assign` reach the parameters FSDP2 keeps."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def split_enabled(split: Optional[bool], default: bool = True) -> bool:
    """Whether to split SVDs across ranks: ``split`` if given, else ``default`` whenever the default
    process group has 2+ ranks. Raises ``ValueError`` for ``split=True`` without a process group."""
    running = dist.is_available() and dist.is_initialized()
    if split and not running:
        raise ValueError("split_svd=True needs an initialized torch.distributed process group")
    wanted = default if split is None else split
    return wanted and running and dist.get_world_size() > 1


def round_robin(
    items: Sequence[Item],
    gather: Callable[[Item], Result],
    compute: Callable[[Result], Result],
    empty: Callable[[Item], Result],
    split: bool,
) -> Iterator[tuple[Item, Result]]:
    """``(item, compute(gather(item)))`` for each of ``items`` in order; with ``split``, each computed by one rank.

    Collective when ``split`` (every rank of the default group passes the same ``items``): items go to
    ranks ``0, 1, ..., world - 1, 0, ...``. Each round of ``world`` items is gathered on every rank
    (``gather`` may itself be collective), kept only by its owner, computed by the owners at once,
    then broadcast from each owner into ``empty(item)`` on the others. So a rank holds at most its
    own item's inputs and two results at a time. Before a round's results are broadcast the ranks
    share whether their ``compute`` raised: the rank that failed raises its error, every other rank
    a ``RuntimeError`` naming it, so no rank is left waiting in a collective.
    """
    if not split:
        for item in items:
            yield item, compute(gather(item))
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    for start in range(0, len(items), world):
        round_items = items[start : start + world]
        own = None
        for offset, item in enumerate(round_items):
            inputs = gather(item)
            if offset == rank:
                own = inputs
            del inputs
        own_result, error = None, None
        try:
            own_result = compute(own) if own is not None else None
        except Exception as err:  # noqa: BLE001 (re-raised below, after the other ranks have been told)
            error = err
        del own
        _raise_if_any_failed(error)
        for offset, item in enumerate(round_items):
            result = own_result if offset == rank else empty(item)
            for tensor in result:
                dist.broadcast(tensor, src=offset)
            yield item, result
            del result
        del own_result  # before the next round's inputs are gathered


def _raise_if_any_failed(error: Optional[BaseException]) -> None:
    """Raise on every rank if ``error`` is set on any rank of the default group (collective)."""
    flags = ranks.gather(torch.tensor([error is not None], device=ranks.collective_device(None)), None)
    if error is not None:
        raise error
    failed = [rank for rank, flag in enumerate(flags) if bool(flag)]
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed to compute their share of a split computation (see their "
                           "error); nothing was changed")
