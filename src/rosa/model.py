"""Module surgery over a whole model: wrap, resample, merge and parameter reports.

No linear algebra lives here: the layers own the math.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import presets, sharded, subspace
from .config import Patterns, RosaConfig, matches
from .distributed import check_wrappers
from .layers import SUPPORTED_TYPES, RosaLayer, check_adaptable, check_weight, is_supported, layer_class_for
from .schedule import reset_optimizer_state

CONFIG_ATTR = "rosa_config"
# Most float32 weight bytes stacked into one batched SVD: bounds the extra memory of wrap and resample.
GROUP_BYTES = 2**28


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _no_match_error(field: str, patterns: Patterns, names: list[str]) -> ValueError:
    sample = ", ".join(repr(n) for n in names[:8]) or "(none)"
    more = f" ... ({len(names)} in all)" if len(names) > 8 else ""
    return ValueError(
        f"RosaConfig.{field}={patterns!r} matches no module of this model. "
        f"Some module names that exist: {sample}{more}"
    )


def find_targets(model: nn.Module, config: RosaConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that ``config`` adapts, in model order.

    Raises ``ValueError`` when an explicit pattern matches nothing, or names an unsupported layer.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    supported = [(n, m) for n, m in named if is_supported(m)]
    patterns = config.target_modules
    preset = presets.preset_targets(model) if patterns is None else None
    if patterns is None and preset is None:
        # Embeddings are adapted only when named: they are often tied to the output head.
        targets = [
            (n, m) for n, m in supported if not presets.is_head(model, n, m) and not isinstance(m, nn.Embedding)
        ]
        presets.log_fallback(model, len(targets))
    else:
        wanted = patterns if patterns is not None else preset
        matched = [(n, m) for n, m in named if matches(n, wanted)]
        if not matched:
            raise _no_match_error("target_modules", wanted, [n for n, _ in supported] or [n for n, _ in named])
        targets = [(n, m) for n, m in matched if is_supported(m)]
        if not targets:
            name, module = matched[0]
            raise ValueError(
                f"RosaConfig.target_modules={wanted!r} matches only layers ROSA cannot adapt, e.g. {name!r} "
                f"({type(module).__name__}); supported: {SUPPORTED_TYPES}"
            )
    targets = [(n, m) for n, m in targets if not matches(n, config.exclude_modules)]
    if not targets:
        raise ValueError("RosaConfig.exclude_modules excludes every target layer; nothing would be trained")
    return targets


def _find_saved(model: nn.Module, config: RosaConfig) -> list[nn.Module]:
    if config.modules_to_save is None:
        return []
    named = [(n, m) for n, m in model.named_modules() if n]
    saved = [m for n, m in named if matches(n, config.modules_to_save)]
    if not saved:
        raise _no_match_error("modules_to_save", config.modules_to_save, [n for n, _ in named])
    return saved


def wrap(model: nn.Module, config: RosaConfig) -> nn.Module:
    """Freeze ``model`` and replace its target layers with ROSA layers, in place; returns ``model``.

    Everything is validated first (config, targets, weights), so an error leaves the model untouched.
    """
    if not isinstance(config, RosaConfig):
        raise TypeError(f"config must be a rosa.RosaConfig, got {type(config).__name__}")
    config.validate()
    check_wrappers(model, "wrap")
    if rosa_layers(model):
        raise ValueError("model already has ROSA layers; call rosa.merge(model) before wrapping again")
    targets = find_targets(model, config)
    saved = _find_saved(model, config)
    for name, module in targets:
        check_weight(module.weight, name)
        check_adaptable(model, name)

    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        layer = layer_class_for(module)(
            module,
            config.rank,
            name=name,
            selection=config.selection,
            seed=config.seed,
            dropout=config.dropout,
            factor_dtype=config.factor_torch_dtype,
            svd=config.svd,
            singular_values=config.singular_values,
            defer_factorize=True,
        )
        if config.train_bias and module.bias is not None:
            module.bias.requires_grad_(True)
        _set_submodule(model, name, layer)
    factorize_layers(rosa_layers(model).values())
    for module in saved:
        module.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def rosa_layers(model: nn.Module) -> dict[str, RosaLayer]:
    """Every ROSA layer of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RosaLayer)}


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable factors (``up`` and ``down``) of every ROSA layer."""
    return [p for layer in rosa_layers(model).values() for p in (layer.up, layer.down)]


def resample(model: nn.Module, optimizer: Optional[Any] = None, *, split_svd: Optional[bool] = None) -> int:
    """Merge every ROSA layer, draw a new subspace, and clear the factors' optimizer state.

    Parameter objects keep their identity, so optimizers, schedulers, DDP and FSDP2 keep working.
    Under FSDP2 each layer is gathered, refactorized and written back into each rank's shard.
    ``split_svd`` (default: on when the default process group has 2+ ranks) computes each group's
    SVD on one rank and broadcasts it (:func:`rosa.sharded.round_robin`); then every rank must call
    resample. Returns the number of layers resampled.
    """
    check_wrappers(model, "resample")
    layers = rosa_layers(model)
    if not layers:
        raise ValueError("model has no ROSA layers; call rosa.wrap(model, config) first")
    split = sharded.split_enabled(split_svd)
    if split:
        sharded.check_same_work([(name, tuple(layer.up.shape), tuple(layer.down.shape)) for name, layer in layers.items()])
    sharded.reshard(model)
    for layer in layers.values():
        layer.resample(defer_factorize=True)
    factorize_layers(layers.values(), split)
    if optimizer is not None:
        reset_optimizer_state(optimizer, factor_parameters(model))
    return len(layers)


def factorize_layers(layers: Iterable[RosaLayer], split: bool = False) -> None:
    """Factorize ``layers`` with one batched SVD per group of equal weight shape, device and settings.

    Same result as ``layer.factorize()`` on each. Groups run one after another, and a group with more
    than ``GROUP_BYTES`` of float32 weights is cut into chunks, so extra memory stays near one chunk's SVD
    (two chunks' results with ``split``, which computes each chunk on one rank and broadcasts it).
    """
    chunks = _factorize_chunks(layers)
    for chunk, factors in sharded.round_robin(chunks, _chunk_weights, _factorize_weights, _empty_factors, split):
        _load_chunk(chunk, factors)
        del factors  # before the next chunk is computed


def _factorize_chunks(layers: Iterable[RosaLayer]) -> list[list[RosaLayer]]:
    groups: dict[tuple, list[RosaLayer]] = {}
    for layer in layers:
        shape = (layer.up.shape[0], layer.down.shape[1])  # the [out, in] weight's, read without gathering it
        key = (shape, layer.up.device, layer.rank, layer.selection, layer.svd, layer.singular_values)
        groups.setdefault(key, []).append(layer)
    chunks = []
    for (shape, *_), members in groups.items():
        size = max(1, GROUP_BYTES // (4 * math.prod(shape)))
        chunks += [members[i : i + size] for i in range(0, len(members), size)]
    return chunks


@torch.no_grad()
def _chunk_weights(layers: list[RosaLayer]) -> tuple:
    return layers, [layer.dense_weight() for layer in layers]


@torch.no_grad()
def _factorize_weights(chunk: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, weights = chunk
    first = layers[0]
    generators = [layer.subspace_generator() for layer in layers]
    return subspace.factorize_group(weights, first.rank, first.selection, generators, first.svd,
                                    first.singular_values)


@torch.no_grad()
def _load_chunk(layers: list[RosaLayer], factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    for layer, up, down, residual in zip(layers, *factors):
        layer.load_factors(up, down, residual)


def _empty_factors(layers: list[RosaLayer]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers for a chunk's ``(up [G, out, R], down [G, R, in], residual [G, out, in])`` as factorize_group returns them."""
    (out, rank), (_, cols), g = layers[0].up.shape, layers[0].down.shape, len(layers)
    device = layers[0].up.device
    return tuple(torch.empty(*shape, dtype=torch.float32, device=device) for shape in
                 ((g, out, rank), (g, rank, cols), (g, out, cols)))


def merge(model: nn.Module) -> nn.Module:
    """Fold every ROSA layer into a plain layer of its original type, in place; returns ``model``."""
    check_wrappers(model, "merge")
    sharded.reshard(model)
    for name, layer in rosa_layers(model).items():
        _set_submodule(model, name, layer.merge())
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


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
