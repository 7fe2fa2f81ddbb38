"""Collective checks that every rank of a process group holds the same thing.

Each is one all-gather of SHA-256 digests; outside an initialized process group they check nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.distributed as dist

DIGEST_WORDS = 4  # a SHA-256 digest as four int64 words


def update_digest(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and bytes into ``digest``."""
    digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy())


def digest_words(digest: "hashlib._Hash") -> list[int]:
    """A SHA-256 digest as ``DIGEST_WORDS`` signed int64 words."""
    raw = digest.digest()
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, 8 * DIGEST_WORDS, 8)]


def gather(local: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """``local`` from every rank of ``group``, by rank (collective: every rank must call it)."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return gathered


def collective_device(group: Any) -> torch.device:
    """Where tensors for ``group``'s collectives live: the current GPU under NCCL, else the CPU."""
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
    words = digest_words(hashlib.sha256(fingerprint.encode()))
    gathered = gather(torch.tensor(words, dtype=torch.int64, device=collective_device(group)), group)
    differing = [rank for rank, g in enumerate(gathered) if not torch.equal(g.cpu(), gathered[0].cpu())]
    if differing:
        raise RuntimeError(
            f"{operation}: rank(s) {differing} differ from rank 0 in their {what}. Every rank must build the "
            "same model with the same RosaConfig (seed included), wrap it before DistributedDataParallel and "
            "call rosa.resample on every rank at the same step."
        )
