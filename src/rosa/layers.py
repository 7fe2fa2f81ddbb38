"""ROSA layers: a frozen base layer holding ``W_res`` plus trainable factors ``up @ down``.

``RosaLayer`` holds what every adapted layer type shares (factorize, merge, resample); a subclass
says how its weight reads as an ``[out, in]`` matrix and how the low-rank path runs forward.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import subspace


def conv1d_type() -> Optional[type]:
    """transformers' ``Conv1D`` class (GPT-2 layout, weight ``[in, out]``), or ``None`` without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``weight`` is a materialized, finite floating-point tensor."""
    if weight.is_meta:
        raise ValueError(
            f"layer {name!r} has a meta-device weight; load real weights (e.g. low_cpu_mem_usage=False "
            "or materialize the model) before rosa.wrap"
        )
    if not weight.is_floating_point():
        raise ValueError(
            f"layer {name!r} has a {weight.dtype} weight; ROSA needs a floating-point weight "
            "(quantized layers are not supported: dequantize first)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r} has NaN or Inf in its weight; fix the checkpoint before rosa.wrap")


def resolve_rank(rank: int | float, out_features: int, in_features: int, name: str) -> int:
    """The integer rank for a layer: a float is a fraction of ``min(out, in)``; too large an int is clipped."""
    full = min(out_features, in_features)
    if isinstance(rank, float):
        return max(1, min(full, round(rank * full)))
    if rank > full:
        warnings.warn(
            f"ROSA rank {rank} exceeds min(out, in) = {full} for layer {name!r}; clipped to {full}",
            stacklevel=3,
        )
        return full
    return rank


class RosaLayer(nn.Module):
    """Shared state and lifecycle of a ROSA-adapted layer.

    Subclasses implement ``dense_weight`` / ``set_dense_weight`` (the base weight as ``[out, in]``)
    and ``forward``.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int | float,
        *,
        name: str = "",
        selection: str = "random",
        seed: int = 0,
        dropout: float = 0.0,
        factor_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_weight(base.weight, name)
        self.base = base
        out_features, in_features = self.dense_weight().shape
        self.name = name
        self.rank = resolve_rank(rank, out_features, in_features, name)
        self.selection = selection
        self.seed = seed
        self.resample_count = 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        weight = base.weight
        dtype = factor_dtype or weight.dtype
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, dtype=dtype, device=weight.device))
        self.down = nn.Parameter(torch.zeros(self.rank, in_features, dtype=dtype, device=weight.device))
        self.factorize()

    # -- the weight as an [out, in] matrix -------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base weight viewed as ``[out, in]``."""
        raise NotImplementedError

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Write an ``[out, in]`` matrix into the base weight (in the base weight's dtype)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------
    @torch.no_grad()
    def factorize(self) -> None:
        """Move a fresh subspace of the base weight into the factors; the layer's function is unchanged."""
        generator = subspace.layer_generator(self.seed, self.name, self.resample_count)
        up, down, residual = subspace.factorize(self.dense_weight(), self.rank, self.selection, generator)
        self.set_dense_weight(residual)
        self.up.copy_(up)
        self.down.copy_(down)

    @torch.no_grad()
    def fold(self) -> None:
        """Add ``up @ down`` into the base weight and zero the factors; the function is unchanged."""
        self.set_dense_weight(subspace.merged_weight(self.dense_weight(), self.up, self.down))
        self.up.zero_()
        self.down.zero_()

    def resample(self) -> None:
        """Fold the factors into the base weight, then factorize a newly drawn subspace."""
        self.fold()
        self.resample_count += 1
        self.factorize()

    def merge(self) -> nn.Module:
        """Fold the factors in and return the plain base layer (this wrapper must not be used again)."""
        self.fold()
        return self.base

    def delta_weight(self) -> torch.Tensor:
        """The current adapter contribution ``up @ down`` as ``[out, in]`` (float32)."""
        return self.up.float() @ self.down.float()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight tensor (``W_res``), for code that inspects ``layer.weight``."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias."""
        return self.base.bias

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rank={self.rank}, selection={self.selection}, resamples={self.resample_count}"


class RosaLinear(RosaLayer):
    """ROSA over ``nn.Linear`` (weight ``[out, in]``) or transformers' ``Conv1D`` (weight ``[in, out]``).

    y = base(x) + up @ (down @ dropout(x)), where base holds ``W_res`` and the bias.
    """

    @property
    def transposed(self) -> bool:
        """True for ``Conv1D``, whose weight is stored ``[in, out]``."""
        return not isinstance(self.base, nn.Linear)

    def dense_weight(self) -> torch.Tensor:
        weight = self.base.weight
        return weight.T if self.transposed else weight

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        target = self.base.weight
        target.copy_(weight.T if self.transposed else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # [..., out]
        h = F.linear(self.dropout(x).to(self.down.dtype), self.down)  # [..., R]
        return result + F.linear(h, self.up).to(result.dtype)  # [..., out]


def is_supported(module: nn.Module) -> bool:
    """Whether ROSA can adapt this module type."""
    return layer_class_for(module) is not None


def layer_class_for(module: nn.Module) -> Optional[type[RosaLayer]]:
    """The ROSA layer class that adapts ``module``, or ``None``."""
    if isinstance(module, RosaLayer):
        return None
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return RosaLinear
    return None
