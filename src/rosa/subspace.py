"""The ROSA subspace math: SVD, seeded index selection and factor construction.

Pure tensor functions. A weight ``W`` is always in ``[out, in]`` layout here; all math is float32.
"""

from __future__ import annotations

import hashlib

import torch


def layer_generator(seed: int, name: str, resample_count: int) -> torch.Generator:
    """A CPU generator determined only by ``(seed, name, resample_count)``.

    Uses a cryptographic hash rather than Python's ``hash`` so every process (and every run)
    derives the same stream with no communication.
    """
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{resample_count}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def select_indices(num_singular: int, rank: int, selection: str, generator: torch.Generator) -> torch.Tensor:
    """Indices ``I`` (sorted, ``[rank]``) of the singular vectors that become trainable.

    Singular values are assumed in descending order (as ``torch.linalg.svd`` returns them).
    ``random`` is a uniform subset without replacement; ``top``/``bottom`` take the largest/smallest.
    """
    if not 1 <= rank <= num_singular:
        raise ValueError(f"rank must be in [1, {num_singular}], got {rank}")
    if selection == "random":
        return torch.randperm(num_singular, generator=generator)[:rank].sort().values
    if selection == "top":
        return torch.arange(rank)
    if selection == "bottom":
        return torch.arange(num_singular - rank, num_singular)
    raise ValueError(f"selection must be 'random', 'top' or 'bottom', got {selection!r}")


def svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin float32 SVD of ``weight`` ``[out, in]``: ``U [out, k]``, ``s [k]``, ``Vh [k, in]``, k = min(out, in)."""
    return torch.linalg.svd(weight.float(), full_matrices=False)


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable factors with the singular values split evenly between them.

    up   = U[:, I] * sqrt(s[I])          [out, R]
    down = sqrt(s[I])[:, None] * Vh[I]   [R, in]
    """
    indices = indices.to(s.device)
    root = s[indices].sqrt()  # [R]
    up = u[:, indices] * root  # [out, R]
    down = root[:, None] * vh[indices]  # [R, in]
    return up, down


def factorize(
    weight: torch.Tensor, rank: int, selection: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``weight`` ``[out, in]`` into ``(up [out, R], down [R, in], residual [out, in])``, float32.

    ``residual + up @ down == weight`` up to float32 rounding.
    """
    w = weight.float()  # [out, in]
    u, s, vh = svd(w)
    indices = select_indices(s.shape[0], rank, selection, generator)
    up, down = split_factors(u, s, vh, indices)
    residual = w - up @ down  # [out, in]
    return up, down, residual


def merged_weight(residual: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``residual + up @ down`` computed in float32: ``[out, in]``."""
    return residual.float() + up.float() @ down.float()
