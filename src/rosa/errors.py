"""Errors shared across rosa's modules, and the finiteness check behind ``NonFiniteError``."""

from __future__ import annotations

from typing import Iterable

import torch


class NonFiniteError(ValueError):
    """Tensors hold NaN or Inf, so the operation was refused and nothing was changed."""


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or +-Inf (0 for non-floating tensors)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())


def raise_if_non_finite(named: Iterable[tuple[str, torch.Tensor]], operation: str, fix: str) -> None:
    """Raise :class:`NonFiniteError` naming every tensor of ``named`` that holds NaN or Inf.

    ``operation`` says what was refused (``"rosa.resample"``), ``fix`` what the user can do about it.
    """
    raise_if_counted(((name, count_non_finite(tensor)) for name, tensor in named), operation, fix)


def raise_if_counted(counts: Iterable[tuple[str, int]], operation: str, fix: str) -> None:
    """As :func:`raise_if_non_finite`, from ``(name, number of non-finite entries)`` counted beforehand."""
    bad = [(name, n) for name, n in counts if n]
    if not bad:
        return
    listed = ", ".join(f"{name} ({n} non-finite)" for name, n in bad[:10])
    more = f" ... ({len(bad)} tensors in all)" if len(bad) > 10 else ""
    raise NonFiniteError(f"{operation} refused: NaN or Inf in {listed}{more}; nothing was changed. {fix}")
