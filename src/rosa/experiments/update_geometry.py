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


NUMERICAL_RTOL = 1e-3  # a singular value counts towards the numerical rank above this share of the largest


def energy_rank(delta: torch.Tensor, fraction: float = 0.9) -> int:
    """The fewest singular directions of ``delta`` whose squared singular values hold ``fraction`` of
    its squared Frobenius norm (0 for a zero matrix)."""
    return _energy_rank(torch.linalg.svdvals(delta.double()), fraction)


def _energy_rank(values: torch.Tensor, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = values**2  # descending
    total = energy.sum()
    if total == 0:
        return 0
    held = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(held, torch.tensor(fraction, dtype=held.dtype) - 1e-12)) + 1


def stable_rank(delta: torch.Tensor) -> float:
    """``||delta||_F^2 / ||delta||_2^2``: between 1 and the rank, insensitive to tiny singular values."""
    return _stable_rank(torch.linalg.svdvals(delta.double()))


def _stable_rank(values: torch.Tensor) -> float:
    return float((values**2).sum() / values[0] ** 2) if values[0] > 0 else 0.0


def numerical_rank(delta: torch.Tensor, rtol: float = NUMERICAL_RTOL) -> int:
    """How many singular values of ``delta`` exceed ``rtol`` times its largest (0 for a zero matrix).

    The default sits between the float32 rounding floor of a merged weight minus its pretrained
    weight (about 1e-5 of the largest singular value) and the directions training writes.
    """
    return _numerical_rank(torch.linalg.svdvals(delta.double()), rtol)


def _numerical_rank(values: torch.Tensor, rtol: float) -> int:
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    return int((values > rtol * values[0]).sum()) if values[0] > 0 else 0


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
                 fraction: float = 0.9, rtol: float = NUMERICAL_RTOL) -> dict[str, float]:
    """Mean and largest :func:`energy_rank`, mean :func:`stable_rank` and mean and largest
    :func:`numerical_rank` of ``after - before`` over layers (one SVD per layer)."""
    spectra = [torch.linalg.svdvals((after[name] - weight).double()) for name, weight in before.items()]
    energy = [_energy_rank(s, fraction) for s in spectra]
    numerical = [_numerical_rank(s, rtol) for s in spectra]
    return {"energy_rank_mean": sum(energy) / len(energy), "energy_rank_max": max(energy),
            "stable_rank_mean": sum(_stable_rank(s) for s in spectra) / len(spectra),
            "numerical_rank_mean": sum(numerical) / len(numerical), "numerical_rank_max": max(numerical)}
