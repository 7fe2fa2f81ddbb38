"""ROSA layers: a frozen base layer holding ``W_res`` plus trainable factors ``up @ down``.

``RosaLayer`` holds what every adapted layer type shares (factorize, merge, resample); a subclass
says how its weight reads as an ``[out, in]`` matrix and how the low-rank path runs forward. Under
FSDP2 the base weight and factors are sharded DTensors: the layer reads them whole through
:func:`rosa.sharded.full` (collective) and writes each rank's shard through :func:`rosa.sharded.assign`.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import sharded, subspace
from .config import LayerSpec
from .errors import raise_if_non_finite


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


def _spec_field(field: str) -> property:
    return property(lambda layer: getattr(layer.spec, field), doc=f"``spec.{field}``, read-only.")


class RosaLayer(nn.Module):
    """Shared state and lifecycle of a ROSA-adapted layer.

    Subclasses implement ``as_dense`` / ``to_base_layout`` (the base weight as ``[out, in]`` and
    back), ``residual_forward`` and ``forward``.
    """

    def __init__(self, base: nn.Module, spec: LayerSpec | int | float, *, name: str = "",
                 defer_factorize: bool = False, **settings: Any) -> None:
        """Adapt ``base`` as ``spec`` says: a :class:`LayerSpec`, or a rank with the other
        :class:`LayerSpec` fields as keywords (``selection``, ``seed``, ``dropout``, ...)."""
        super().__init__()
        if not isinstance(spec, LayerSpec):
            spec = LayerSpec(spec, **settings)
        elif settings:
            raise TypeError(f"pass the settings in the LayerSpec, not also as keywords: {', '.join(settings)}")
        check_weight(base.weight, name)
        self.check_variant(base, name)
        self.base = base
        out_features, in_features = self.dense_weight().shape
        self.name = name
        self.spec = spec
        self.rank = resolve_rank(spec.rank, out_features, in_features, name)
        # the resample count fixes the next subspace draw, so it travels with state_dict()
        self.register_buffer("resamples", torch.zeros((), dtype=torch.int64, device=base.weight.device))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        weight = base.weight
        self.weight_dtype = weight.dtype  # what the plain layer computes in, and what merge returns
        self.residual_dtype = spec.residual_dtype or weight.dtype
        dtype = spec.factor_dtype or weight.dtype
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, dtype=dtype, device=weight.device))
        self.down = nn.Parameter(torch.zeros(self.rank, in_features, dtype=dtype, device=weight.device))
        self.register_load_state_dict_pre_hook(_refuse_plain_layer_state)
        if not defer_factorize:  # deferred: zero factors and an untouched base until a batched factorize
            self.factorize()

    selection = _spec_field("selection")
    seed = _spec_field("seed")
    svd = _spec_field("svd")
    singular_values = _spec_field("singular_values")

    @classmethod
    def check_variant(cls, base: nn.Module, name: str) -> None:
        """Raise ``ValueError`` naming the layer if this configuration of its type cannot be adapted."""

    @property
    def resample_count(self) -> int:
        """How many resamples this layer has had (the persistent buffer ``resamples``)."""
        return int(self.resamples)

    @resample_count.setter
    def resample_count(self, value: int) -> None:
        self.resamples.fill_(value)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """As ``nn.Module._apply``; a dtype conversion (``.double()``, ``.to(dtype)``) also converts
        the dtypes the layer computes in and keeps its residual in."""
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        self.residual_dtype = fn(torch.empty(0, dtype=self.residual_dtype)).dtype
        return super()._apply(fn, recurse)

    # -- the weight as an [out, in] matrix -------------------------------------------------------
    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """A whole weight in the base layer's layout viewed as ``[out, in]``."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The base weight viewed as ``[out, in]`` (all-gathered when it is sharded)."""
        return self.as_dense(sharded.full(self.base.weight))

    @property
    def dense_shape(self) -> tuple[int, int]:
        """``(out, in)`` of :meth:`dense_weight`, read without gathering a sharded weight."""
        return self.up.shape[0], self.down.shape[1]

    def to_base_layout(self, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """An ``[out, in]`` matrix (a temporary, which this may overwrite) in the base weight's layout.

        ``residual`` (default the base weight) is the whole weight it replaces, in the base layout.
        """
        raise NotImplementedError

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Write an ``[out, in]`` matrix (a temporary) into the base weight, in the base weight's dtype
        (each rank's shard when it is sharded)."""
        sharded.assign(self.base.weight, self.to_base_layout(weight))

    def residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output computed with its weight's own dtype (a float32 residual), in any dtype."""
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer (``W_res`` and bias) on ``x``; a residual kept in float32 under a lower-precision
        layer computes in float32 and returns the layer's own dtype."""
        if self.base.weight.dtype == self.weight_dtype:
            return self.base(x)
        return self.residual_forward(x).to(self.weight_dtype)

    # -- lifecycle -------------------------------------------------------------------------------
    def subspace_generator(self, resample_count: Optional[int] = None) -> torch.Generator:
        """The generator of the index set drawn after ``resample_count`` resamples (default: the current one).

        Depends on (seed, name, resample count) only.
        """
        count = self.resample_count if resample_count is None else resample_count
        return subspace.layer_generator(self.seed, self.name, count)

    def named_state(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """The tensors a fold reads, labelled for error messages: ``up``, ``down`` and the residual,
        whole (all-gathered when sharded, so every rank sees the same values)."""
        return [(f"{name}.up", sharded.full(self.up)), (f"{name}.down", sharded.full(self.down)),
                (f"{name} residual", sharded.full(self.base.weight))]

    @torch.no_grad()
    def write_source(self, out: torch.Tensor, fold: bool) -> torch.Tensor:
        """Write into float32 ``out [out, in]`` the weight a factorization splits, and return it.

        ``W_res`` (a first factorization), or ``W_res + up @ down`` when ``fold`` (a resample). Nothing
        in the layer changes: the fold happens in float32, outside the base weight. A residual kept
        in bfloat16/float16 has the folded weight rounded to that dtype (the weight ``rosa.merge``
        would return): the model's own grid pulls rounding errors back, which measured 1.5x less
        drift over many resamples than keeping the float32 fold.
        """
        if not fold:
            return out.copy_(self.dense_weight())
        return self.fold_into(out, self.dense_weight(), sharded.full(self.up), sharded.full(self.down))

    @torch.no_grad()
    def fold_into(self, out: torch.Tensor, residual: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Write ``residual [out, in] + up @ down`` into float32 ``out [out, in]`` (rounded to the residual
        dtype when that is lower) and return it; all whole tensors."""
        out.copy_(residual).addmm_(up.float(), down.float())
        if self.residual_dtype.itemsize < 4:
            out.copy_(out.to(self.residual_dtype))
        return out

    def source_weight(self, fold: bool) -> torch.Tensor:
        """:meth:`write_source` into a new float32 tensor."""
        out = torch.empty(self.dense_shape, dtype=torch.float32, device=self.up.device)
        return self.write_source(out, fold)

    @torch.no_grad()
    def draw(self, fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """New factors ``(up, down)`` in the factors' dtype, for the next subspace (``fold``: after a
        resample); nothing in the layer changes. Install them with :meth:`install`."""
        count = self.resample_count + int(fold)
        up, down, _ = subspace.factorize_group(self.source_weight(fold)[None], self.rank, self.selection,
                                               [self.subspace_generator(count)], self.svd, self.singular_values)
        return up[0].to(self.up.dtype), down[0].to(self.down.dtype)

    @torch.no_grad()
    def install(self, up: torch.Tensor, down: torch.Tensor, fold: bool) -> None:
        """Make ``up``/``down`` (from :meth:`draw` or a batched equivalent, same ``fold``) the factors.

        The residual becomes the float32 source weight minus ``up @ down`` of the factors as stored,
        rounded once into the residual's dtype. ``fold`` also counts the resample.
        """
        residual = self.source_weight(fold).addmm_(up.float(), down.float(), alpha=-1)  # [out, in]
        self.load_factors(up, down, residual)
        if fold:
            self.resample_count += 1

    def factorize(self) -> None:
        """Move a fresh subspace of the base weight into the factors; the layer's function is unchanged."""
        self.install(*self.draw(fold=False), fold=False)

    def resample(self) -> None:
        """Fold the factors into the weight (in float32) and factorize a newly drawn subspace.

        Raises :class:`rosa.NonFiniteError` and changes nothing if a factor or the residual holds NaN or Inf.
        """
        raise_if_non_finite(self.named_state(self.name), "resample", "Restore the last good checkpoint.")
        self.install(*self.draw(fold=True), fold=True)

    @torch.no_grad()
    def load_factors(self, up: torch.Tensor, down: torch.Tensor, residual: torch.Tensor) -> None:
        """Install a factorization: ``residual [out, in]`` into the (frozen) base weight, stored in
        the residual dtype, and the factors into ``up``/``down``."""
        self._retype_weight(self.residual_dtype)
        self.set_dense_weight(residual)
        sharded.assign(self.up, up)
        sharded.assign(self.down, down)

    def _retype_weight(self, dtype: torch.dtype) -> None:
        """Store the base weight in ``dtype`` (a new frozen Parameter, values converted); no-op if it already is."""
        if self.base.weight.dtype != dtype:
            self.base.weight = nn.Parameter(self.base.weight.detach().to(dtype), requires_grad=False)
        self.base.weight.requires_grad_(False)

    @torch.no_grad()
    def fold(self) -> None:
        """Add ``up @ down`` into the base weight (in float32, rounded once) and zero the factors."""
        self.set_dense_weight(self.source_weight(fold=True))
        self.up.zero_()
        self.down.zero_()

    @torch.no_grad()
    def merged_base_weight(self) -> torch.Tensor:
        """The base layer's weight as :meth:`merge` leaves it (its layout, its original dtype), as a
        new tensor; the layer is unchanged."""
        return self.merged_weight(sharded.full(self.base.weight), sharded.full(self.up), sharded.full(self.down))

    @torch.no_grad()
    def merged_weight(self, residual: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """:meth:`merged_base_weight` of given whole tensors (a residual in the base layout, and factors),
        such as a full state dict's: no collective, even when the layer is sharded."""
        out = torch.empty(self.dense_shape, dtype=torch.float32, device=up.device)
        folded = self.fold_into(out, self.as_dense(residual), up, down)
        return self.to_base_layout(folded, residual).to(self.weight_dtype)

    def merge(self) -> nn.Module:
        """Fold the factors in and return the plain base layer, its weight back in its original dtype
        (this wrapper must not be used again)."""
        merged = self.merged_base_weight()
        self._retype_weight(self.weight_dtype)
        with torch.no_grad():
            sharded.assign(self.base.weight, merged)
            self.up.zero_()
            self.down.zero_()
        return self.base

    @property
    def weight(self) -> torch.Tensor:
        """The base weight tensor (``W_res``), for code that inspects ``layer.weight``."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias."""
        return self.base.bias

    def extra_repr(self) -> str:
        """Name, resolved rank, the settings that differ from :class:`LayerSpec`'s defaults, and resample count."""
        changed = [f"{f.name}={getattr(self.spec, f.name)}" for f in fields(LayerSpec)
                   if f.name != "rank" and getattr(self.spec, f.name) != f.default]
        return ", ".join([f"name={self.name!r}", f"rank={self.rank}", *changed, f"resamples={self.resample_count}"])


def _refuse_plain_layer_state(layer: RosaLayer, state_dict: dict, prefix: str, *_: object) -> None:
    """Refuse a state dict that holds this layer as a plain layer: loading it would silently keep the current
    residual and factors."""
    if f"{prefix}weight" in state_dict and f"{prefix}base.weight" not in state_dict:
        raise ValueError(
            f"the state dict holds layer {prefix[:-1]!r} as a plain layer (a merged model, as save_pretrained of "
            "a wrapped model writes it), which cannot restore a ROSA layer. Load it into a model that is not wrapped; "
            "to resume a Trainer run, train with rosa.integrations.RosaCallback, whose checkpoints keep the ROSA state"
        )


class RosaLinear(RosaLayer):
    """ROSA over ``nn.Linear`` (weight ``[out, in]``) or transformers' ``Conv1D`` (weight ``[in, out]``).

    y = base(x) + up @ (down @ dropout(x)), where base holds ``W_res`` and the bias.
    """

    @property
    def transposed(self) -> bool:
        """True for ``Conv1D``, whose weight is stored ``[in, out]``."""
        return not isinstance(self.base, nn.Linear)

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.transposed else weight

    def to_base_layout(self, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return weight.T if self.transposed else weight

    def residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.dense_weight(), self.base.bias
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)  # [..., out]
        h = F.linear(self.dropout(x).to(self.down.dtype), self.down)  # [..., R]
        return result + F.linear(h, self.up).to(result.dtype)  # [..., out]


class RosaConv2d(RosaLayer):
    """ROSA over ``nn.Conv2d``: the kernel ``[out, in/groups, kh, kw]`` read as ``[out, in/groups*kh*kw]``.

    y = base(x) + up_conv(down_conv(dropout(x))), where base holds ``W_res`` and the bias, ``down_conv``
    has R output channels and the base layer's kernel size, stride, padding, dilation and padding mode,
    and ``up_conv`` is 1x1. Grouped and depthwise convolutions are exact: each group's input goes
    through the same R down filters (the columns of ``[out, in/groups*kh*kw]`` index a group's own
    channels), and output channel ``o`` reads the R channels of its group, so the path costs
    ``groups * R`` intermediate channels. Dropout acts on the input of the down convolution.
    """

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)  # [out, in/groups*kh*kw]

    def to_base_layout(self, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return weight.reshape(self.base.weight.shape)

    def residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        return self.base._conv_forward(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        result = self.base_forward(x)  # [B, out, H', W']
        down = self.down.view(self.rank, -1, *base.kernel_size)  # [R, in/groups, kh, kw]
        down = down.repeat(base.groups, 1, 1, 1)  # [groups*R, in/groups, kh, kw], shared by every group
        # base's own convolution with the down kernel: same stride, padding, dilation, padding mode, groups
        h = base._conv_forward(self.dropout(x).to(self.down.dtype), down, None)  # [B, groups*R, H', W']
        up = self.up.view(*self.up.shape, 1, 1)  # [out, R, 1, 1]
        return result + F.conv2d(h, up, groups=base.groups).to(result.dtype)  # [B, out, H', W']


class RosaEmbedding(RosaLayer):
    """ROSA over ``nn.Embedding``: the table ``[num_embeddings, dim]`` is the ``[out, in]`` matrix.

    y = base(ids) + up[ids] @ down, where base holds ``W_res``. The padding row (``padding_idx``) is
    never adapted: it stays exactly as it was in the base table, and its row of ``up`` is zero and
    gets no gradient. ``max_norm``, ``scale_grad_by_freq`` and ``sparse=True`` are rejected. Dropout
    does not apply (token ids are not dropped), as in PEFT.
    """

    @classmethod
    def check_variant(cls, base: nn.Module, name: str) -> None:
        if base.max_norm is not None:
            raise ValueError(
                f"embedding {name!r} has max_norm={base.max_norm}, which renormalizes looked-up rows in "
                "place; ROSA does not support it: exclude this layer or build the embedding without max_norm"
            )
        if base.scale_grad_by_freq:
            raise ValueError(
                f"embedding {name!r} uses scale_grad_by_freq=True; ROSA cannot scale the shared ``down`` factor's "
                "gradient per token: exclude this layer or build the embedding without scale_grad_by_freq"
            )
        if base.sparse:
            raise ValueError(
                f"embedding {name!r} uses sparse=True gradients; ROSA's factors train densely: exclude this "
                "layer or build the embedding with sparse=False"
            )

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # [num_embeddings, dim]

    def to_base_layout(self, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight`` with the padding row overwritten by the table's, which so keeps its original value exactly."""
        padding_idx = self.base.padding_idx
        if padding_idx is not None:
            table = self.dense_weight() if residual is None else residual
            weight[padding_idx] = table[padding_idx]
        return weight

    @torch.no_grad()
    def load_factors(self, up: torch.Tensor, down: torch.Tensor, residual: torch.Tensor) -> None:
        """As :meth:`RosaLayer.load_factors`; the padding row's factor row is zero, so it is never adapted."""
        if self.base.padding_idx is not None:
            up = up.clone()
            up[self.base.padding_idx] = 0
        super().load_factors(up, down, residual)

    def residual_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.base.weight, self.base.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base
        result = self.base_forward(ids)  # [..., dim]
        h = F.embedding(ids, self.up, base.padding_idx)  # [..., R]; padding_idx: no gradient to that (zero) row
        return result + (h @ self.down).to(result.dtype)  # [..., dim]


def is_supported(module: nn.Module) -> bool:
    """Whether ROSA can adapt this module type."""
    return layer_class_for(module) is not None


# The module types :func:`layer_class_for` adapts, for error messages.
SUPPORTED_TYPES = "nn.Linear, transformers Conv1D, nn.Conv2d, nn.Embedding"


def layer_class_for(module: nn.Module) -> Optional[type[RosaLayer]]:
    """The ROSA layer class that adapts ``module``, or ``None``."""
    if isinstance(module, RosaLayer):
        return None
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return RosaLinear
    if isinstance(module, nn.Conv2d):
        return RosaConv2d
    if isinstance(module, nn.Embedding):
        return RosaEmbedding
    return None
