"""Module surgery over a whole model: wrap, resample, merge, merged saves and parameter reports.

No linear algebra lives here: the layers own the math.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import sharded, subspace
from .config import RosaConfig
from .errors import count_non_finite, raise_if_counted, raise_if_non_finite
from .layers import RosaLayer, layer_class_for
from .optimizer_state import check_optimizer, reset_optimizer_state
from .ranks import check_same_on_ranks
from .targets import check_targets, find_modules_to_save, find_targets
from .wrappers import check_wrappers

CONFIG_ATTR = "rosa_config"
SAVE_ATTR = "save_pretrained"  # a Hugging Face model's method that wrap overrides on the instance
EXACT_SAVE_ATTR = "rosa_exact_save"  # set while save_pretrained must write the exact ROSA state
# Most float32 weight bytes stacked into one batched SVD: bounds the extra memory of wrap and resample.
GROUP_BYTES = 2**28
NON_FINITE_FIX = ("A training step diverged (e.g. too high a learning rate, or fp16 overflow): restore the last "
                  "good checkpoint and lower the learning rate or clip gradients.")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _wrap_fingerprint(config: RosaConfig, names: list[str]) -> str:
    return json.dumps({"config": config.to_dict(), "targets": names}, sort_keys=True, default=str)


def _resample_fingerprint(layers: dict[str, RosaLayer]) -> str:
    settings = [(layer.name, layer.dense_shape, layer.rank, layer.spec.to_dict(), str(layer.up.dtype),
                 str(layer.residual_dtype), layer.resample_count) for layer in layers.values()]
    return json.dumps(settings)


def wrap(model: nn.Module, config: RosaConfig, *, check_ranks: bool = True) -> nn.Module:
    """Freeze ``model`` and replace its target layers with ROSA layers, in place; returns ``model``.

    Everything is validated and every layer factorized first (config, targets, weights, SVDs), so an
    error leaves the model untouched. When ``torch.distributed`` is initialized and ``check_ranks``
    is true, every rank must call ``wrap`` with the same config and targeted layers (one all-gather
    of a hash; a ``RuntimeError`` names the ranks that differ); pass ``check_ranks=False`` to wrap
    on some ranks only.
    """
    if not isinstance(config, RosaConfig):
        raise TypeError(f"config must be a rosa.RosaConfig, got {type(config).__name__}")
    config.validate()
    check_wrappers(model, "wrap")
    if rosa_layers(model):
        raise ValueError("model already has ROSA layers; call rosa.merge(model) before wrapping again")
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    check_targets(model, targets)
    if check_ranks:
        check_same_on_ranks(_wrap_fingerprint(config, [n for n, _ in targets]), "rosa.wrap",
                            "RosaConfig or set of target layers")

    spec = config.layer_spec()
    layers = {name: layer_class_for(module)(module, spec, name=name, defer_factorize=True) for name, module in targets}
    factorize_layers(layers.values())
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        if config.train_bias and layer.base.bias is not None:
            layer.base.bias.requires_grad_(True)
        _set_submodule(model, name, layer)
    for module in saved:
        module.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    if callable(getattr(type(model), SAVE_ATTR, None)):
        setattr(model, SAVE_ATTR, MergedSavePretrained(model))
    return model


def rosa_layers(model: nn.Module) -> dict[str, RosaLayer]:
    """Every ROSA layer of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RosaLayer)}


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable factors (``up`` and ``down``) of every ROSA layer."""
    return [p for layer in rosa_layers(model).values() for p in (layer.up, layer.down)]


def resample(model: nn.Module, optimizer: Optional[Any] = None, *, check_ranks: bool = True,
             split_svd: Optional[bool] = None) -> int:
    """Fold every ROSA layer's factors into its weight, draw a new subspace, and clear the factors' optimizer state.

    All or nothing: every check runs and every layer's new factors are computed before any layer
    changes, so an error (a :class:`rosa.NonFiniteError` naming the layers whose factors or residual
    hold NaN/Inf, a failed SVD, a bad optimizer) leaves every weight, factor, resample count and the
    optimizer state as they were. Extra memory: see :func:`factorize_layers`. ``optimizer`` must hold
    the factors (build it after ``wrap``).

    When ``torch.distributed`` is initialized and ``check_ranks`` is true, the ranks first compare
    their layers' names, shapes, settings and resample counts (one all-gather of a hash; a
    ``RuntimeError`` names the ranks that differ); ``check_ranks=False`` skips that, to resample a
    model on some ranks only. ``split_svd`` (default: on when ``check_ranks`` is and the default
    process group has 2+ ranks) computes each SVD chunk on one rank, round robin, and broadcasts its
    result, so every rank must call resample; the ranks are then always compared first. Under FSDP2
    (``fully_shard``) every rank must call resample too: each layer is all-gathered, NaN/Inf is
    checked on the gathered tensors (so every rank raises the same error), and the new residual and
    factors are written into each rank's shard.

    Parameter objects keep their identity, so optimizers, schedulers, DDP and FSDP2 keep working.
    Returns the number of layers resampled.
    """
    check_wrappers(model, "resample")
    layers = rosa_layers(model)
    if not layers:
        raise ValueError("model has no ROSA layers; call rosa.wrap(model, config) first")
    if optimizer is not None:
        check_optimizer(optimizer, factor_parameters(model))
    split = sharded.split_enabled(split_svd, default=check_ranks)
    if check_ranks or split:
        check_same_on_ranks(_resample_fingerprint(layers), "rosa.resample", "ROSA layer settings or resample counts")
    sharded.reshard(model)
    raise_if_non_finite(_named_state(layers), "rosa.resample", NON_FINITE_FIX)
    factorize_layers(layers.values(), fold=True, split=split)
    if optimizer is not None:
        reset_optimizer_state(optimizer, factor_parameters(model))
    return len(layers)


def _named_state(layers: dict[str, RosaLayer]) -> Iterable[tuple[str, torch.Tensor]]:
    return (item for name, layer in layers.items() for item in layer.named_state(name))


def factorize_layers(layers: Iterable[RosaLayer], fold: bool = False, split: bool = False) -> None:
    """Factorize ``layers`` (``fold``: resample them) all or nothing, batching equal shapes and settings.

    Same result as ``layer.factorize()`` (``layer.resample()``) on each. First every layer's new
    factors are drawn, one batched SVD per group of equal weight shape, device and settings, a group
    with more than ``GROUP_BYTES`` of float32 weights cut into chunks; the folded weights, the factors
    and the new residuals are checked for NaN/Inf. Only then does any layer change: each installs its
    factors and recomputes its residual in float32 (into each rank's shard under FSDP2). ``split``
    (collective) computes each chunk on one rank, round robin (:func:`rosa.sharded.round_robin`), and
    broadcasts its factors and NaN/Inf counts, so every rank installs the same factors or raises the
    same error.

    Extra memory, per rank and sharded or not: one chunk's full float32 weights and its SVD (about 4x
    those weights; with ``split``, a round of one chunk per rank is gathered one chunk at a time and
    only this rank's kept, plus two chunks' factors in flight), and one full copy of every layer's new
    factors, which must all exist before the first layer changes; then one layer's full float32 weight
    and factors at a time.
    """
    operation = "rosa.resample" if fold else "rosa.wrap"
    drawn = []
    for chunk, (ups, downs, counts) in sharded.round_robin(
        _factorize_chunks(layers, dist.get_world_size() if split else 1),
        partial(_chunk_source, fold=fold, operation=operation),
        partial(_draw_chunk, fold=fold), _empty_draw, split,
    ):
        raise_if_counted(((f"{layer.name}.{part}", int(n)) for layer, row in zip(chunk, counts)
                          for part, n in zip(("up", "down", "residual"), row)), operation,
                         "The new factors or residual overflow their dtype: use factor_dtype='float32' or "
                         "residual_dtype='float32'.")
        drawn += [(layer, up.to(layer.up.dtype), down.to(layer.down.dtype))
                  for layer, up, down in zip(chunk, ups, downs)]
    for layer, up, down in drawn:
        layer.install(up, down, fold)


def _factorize_chunks(layers: Iterable[RosaLayer], parts: int = 1) -> list[list[RosaLayer]]:
    """Groups of equal shape and settings, cut to at most ``GROUP_BYTES`` each and into at least ``parts``
    chunks per group (when it has that many layers), so ``parts`` ranks share each group's SVDs evenly."""
    groups: dict[tuple, list[RosaLayer]] = {}
    for layer in layers:
        key = (layer.dense_shape, layer.up.device, layer.rank, layer.spec)
        groups.setdefault(key, []).append(layer)
    chunks = []
    for (shape, *_), members in groups.items():
        size = max(1, min(GROUP_BYTES // (4 * math.prod(shape)), math.ceil(len(members) / parts)))
        chunks += [members[i : i + size] for i in range(0, len(members), size)]
    return chunks


@torch.no_grad()
def _chunk_source(layers: list[RosaLayer], fold: bool, operation: str) -> tuple[list[RosaLayer], torch.Tensor]:
    """A chunk's layers and their float32 source weights ``[G, out, in]``; raises if a folded weight is non-finite."""
    stack = torch.empty(len(layers), *layers[0].dense_shape, dtype=torch.float32, device=layers[0].up.device)
    for row, layer in zip(stack, layers):
        layer.write_source(row, fold)
    raise_if_non_finite(((f"{layer.name} folded weight", row) for layer, row in zip(layers, stack)),
                        operation, "The folded weight overflows float32.")
    return layers, stack


@torch.no_grad()
def _draw_chunk(source: tuple[list[RosaLayer], torch.Tensor], fold: bool) -> tuple[torch.Tensor, ...]:
    """A chunk's new float32 factors ``up [G, out, R]``, ``down [G, R, in]`` and ``[G, 3]`` counts of the
    non-finite entries of each layer's up, down and residual, in their dtypes."""
    layers, stack = source
    first = layers[0]
    generators = [layer.subspace_generator(layer.resample_count + int(fold)) for layer in layers]
    ups, downs, residuals = subspace.factorize_group(stack, first.rank, first.selection, generators, first.svd,
                                                     first.singular_values)
    counts = torch.tensor([[count_non_finite(up.to(layer.up.dtype)), count_non_finite(down.to(layer.down.dtype)),
                            count_non_finite(residual.to(layer.residual_dtype))]
                           for layer, up, down, residual in zip(layers, ups, downs, residuals)], device=stack.device)
    return ups.contiguous(), downs.contiguous(), counts


def _empty_draw(layers: list[RosaLayer]) -> tuple[torch.Tensor, ...]:
    """Buffers shaped as :func:`_draw_chunk`'s result for ``layers``."""
    (out, cols), rank, device = layers[0].dense_shape, layers[0].rank, layers[0].up.device
    return (torch.empty(len(layers), out, rank, device=device), torch.empty(len(layers), rank, cols, device=device),
            torch.empty(len(layers), 3, dtype=torch.int64, device=device))


def merge(model: nn.Module) -> nn.Module:
    """Fold every ROSA layer into a plain layer of its original type and dtype, in place; returns ``model``.

    Under FSDP2 every rank must call it: each layer is all-gathered, folded, and written back into
    each rank's shard, so ``get_model_state_dict(..., full_state_dict=True)`` then holds the plain model.

    Raises :class:`rosa.NonFiniteError`, changing nothing, if a factor or residual holds NaN or Inf.
    """
    check_wrappers(model, "merge")
    sharded.reshard(model)
    layers = rosa_layers(model)
    _refuse_sharded_retype(layers)
    raise_if_non_finite(_named_state(layers), "rosa.merge", NON_FINITE_FIX)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.merge())
    for attr in (CONFIG_ATTR, EXACT_SAVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    if isinstance(vars(model).get(SAVE_ATTR), MergedSavePretrained):
        delattr(model, SAVE_ATTR)
    return model


def _refuse_sharded_retype(layers: dict[str, RosaLayer]) -> None:
    """Raise ``ValueError`` if merging would have to change a sharded (FSDP2) weight's dtype."""
    kept = [name for name, layer in layers.items()
            if sharded.is_sharded(layer.base.weight) and layer.base.weight.dtype != layer.weight_dtype]
    if kept:
        raise ValueError(
            f"rosa.merge cannot merge {len(kept)} sharded layers (e.g. {kept[0]}) whose residual is kept in another "
            "dtype (RosaConfig.residual_dtype) than their weight: FSDP2 cannot change a sharded parameter's dtype. "
            "Nothing was changed. Take the plain model's state dict instead (collective): rosa.merged_state_dict("
            "model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))")


def merged_state_dict(model: nn.Module, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict ``rosa.merge(model)`` would have, computed without changing ``model``.

    ``state`` (default ``model.state_dict()``) with each ROSA layer's entries replaced by its base
    layer's: ``weight`` the merged weight (new tensors: one copy of the adapted weights), ``bias``
    as it is; the factors and resample counts dropped. The merged weights are computed from the
    residuals and factors ``state`` holds. Raises :class:`rosa.NonFiniteError` if one of them holds
    NaN or Inf.

    Under FSDP2, a full state dict (``get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True))``) gives the whole plain model's state dict without any collective, so one
    rank may call it alone (as the Hugging Face Trainer's ``save_model`` does); with the default
    ``model.state_dict()`` (sharded tensors) every rank must call it.
    """
    state = model.state_dict() if state is None else state
    every = rosa_layers(model)
    layers = {name: layer for name, layer in every.items() if f"{name}.base.weight" in state}

    counts, weights = [], {}  # each layer's tensors are gathered once (a collective for sharded ones)
    for name, layer in layers.items():
        whole = {key: sharded.full(state.get(f"{name}.{key}", tensor))
                 for key, tensor in (("up", layer.up), ("down", layer.down), ("base.weight", layer.base.weight))}
        counts += [(f"{name}.{key}", count_non_finite(tensor)) for key, tensor in whole.items()]
        weights[name] = layer.merged_weight(whole["base.weight"], whole["up"], whole["down"]).contiguous()
    raise_if_counted(counts, "saving the merged model", NON_FINITE_FIX)
    merged = {}
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        layer_name, _, base = owner.rpartition(".")
        if owner in every:  # up, down, resamples
            continue
        if base == "base" and layer_name in layers:
            merged[f"{layer_name}.{leaf}"] = weights[layer_name] if leaf == "weight" else value
        else:
            merged[key] = value
    return merged


def set_exact_saves(model: nn.Module, exact: bool) -> None:
    """Whether ``model.save_pretrained`` writes the exact ROSA state (Trainer checkpoints) or the merged model."""
    setattr(model, EXACT_SAVE_ATTR, exact)


class MergedSavePretrained:
    """``save_pretrained`` of a wrapped Hugging Face model: writes the merged plain model.

    The saved folder loads with plain transformers (``from_pretrained``, no rosa needed) and computes
    what the wrapped model computes; the wrapped model is not changed, so training goes on. While
    :func:`set_exact_saves` is on (``RosaCallback`` turns it on for the length of ``Trainer.train``),
    it writes the exact ROSA state instead, so Trainer checkpoints resume exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        save = getattr(type(model), SAVE_ATTR)
        if getattr(model, EXACT_SAVE_ATTR, False):
            return save(model, save_directory, *args, **kwargs)
        state = merged_state_dict(model, kwargs.pop("state_dict", None))
        return save(model, save_directory, *args, state_dict=state, **kwargs)


def parameter_report(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts, and ROSA's reduction factor ``rho``.

    ``rho = sum(out * in) / sum(R * (out + in))`` over the ROSA layers (0 when there are none).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = rosa_layers(model).values()
    dense = sum(layer.up.shape[0] * layer.down.shape[1] for layer in layers)
    factors = sum(layer.up.numel() + layer.down.numel() for layer in layers)
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "rosa_layers": len(layers),
        "factor_parameters": factors,
        "rho": dense / factors if factors else 0.0,
    }


def print_trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Print (and return) the parameter report of :func:`parameter_report`."""
    report = parameter_report(model)
    print(
        f"trainable params: {report['trainable']:,} || all params: {report['total']:,} || "
        f"trainable%: {report['trainable_percent']:.4f} || ROSA layers: {report['rosa_layers']} || "
        f"rho: {report['rho']:.2f}"
    )
    return report
