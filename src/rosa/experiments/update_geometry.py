"""Where a fine-tuning update lies: how many directions it spans, and how far ROSA's subspaces move.

Pure measurements on ``[out, in]`` matrices and ROSA factors, for ``benchmarks/glue_update_geometry.py``.
Everything is computed in float64.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from rosa.model import rosa_layers

Subspaces = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (left [out, R], right [in, R]) bases


def energy_rank(delta: torch.Tensor, fraction: float = 0.9) -> int:
    """The fewest singular directions of ``delta`` whose squared singular values hold ``fraction`` of
    its squared Frobenius norm (0 for a zero matrix)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = torch.linalg.svdvals(delta.double()) ** 2  # [min(out, in)], descending
    total = energy.sum()
    if total == 0:
        return 0
    held = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(held, torch.tensor(fraction, dtype=held.dtype) - 1e-12)) + 1


def stable_rank(delta: torch.Tensor) -> float:
    """``||delta||_F^2 / ||delta||_2^2``: between 1 and the rank, insensitive to tiny singular values."""
    s = torch.linalg.svdvals(delta.double())
    return float((s**2).sum() / s[0] ** 2) if s[0] > 0 else 0.0


def orthonormal_basis(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[n, k]`` of the column space of ``columns`` ``[n, k]`` (full column rank)."""
    q, _ = torch.linalg.qr(columns.double())
    return q


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of ``a`` ``[n, R]`` and ``b``
    ``[n, R]``: 1 for the same subspace, 0 for orthogonal ones, about R / n for two random ones."""
    if a.shape != b.shape:
        raise ValueError(f"subspace_overlap needs bases of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    return float((qa.T @ qb).square().sum() / a.shape[1])  # ||Qa^T Qb||_F^2 / R


def factor_subspaces(model: nn.Module) -> Subspaces:
    """Each ROSA layer's current factor spaces: the columns of ``up`` ``[out, R]`` and the rows of
    ``down`` ``[R, in]`` (as columns, ``[in, R]``), copied."""
    return {name: (layer.up.detach().double().clone(), layer.down.detach().double().T.clone())
            for name, layer in rosa_layers(model).items()}


def consecutive_overlaps(snapshots: list[Subspaces]) -> list[float]:
    """For each pair of consecutive snapshots, the :func:`subspace_overlap` averaged over layers and over
    both sides (output and input space)."""
    overlaps = []
    for before, after in zip(snapshots, snapshots[1:]):
        per_side = [subspace_overlap(before[name][side], after[name][side]) for name in before for side in (0, 1)]
        overlaps.append(sum(per_side) / len(per_side))
    return overlaps


def layer_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The ``weight`` of each named module of a plain (merged) model, copied in float64."""
    return {name: model.get_submodule(name).weight.detach().double().clone() for name in names}


def update_ranks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                 fraction: float = 0.9) -> dict[str, float]:
    """Mean and largest :func:`energy_rank`, and mean :func:`stable_rank`, of ``after - before`` over layers."""
    deltas = [after[name] - weight for name, weight in before.items()]
    ranks = [energy_rank(d, fraction) for d in deltas]
    return {"energy_rank_mean": sum(ranks) / len(ranks), "energy_rank_max": max(ranks),
            "stable_rank_mean": sum(stable_rank(d) for d in deltas) / len(deltas)}
