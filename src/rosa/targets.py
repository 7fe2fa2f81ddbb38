"""Which modules of a model ROSA adapts and which it trains fully, and whether each target can be adapted."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from . import presets
from .config import Patterns, RosaConfig, matches
from .layers import SUPPORTED_TYPES, RosaLinear, check_weight, is_supported, layer_class_for

logger = logging.getLogger("rosa")

def _no_match_error(field: str, patterns: Patterns, names: list[str]) -> ValueError:
    sample = ", ".join(repr(n) for n in names[:8]) or "(none)"
    more = f" ... ({len(names)} in all)" if len(names) > 8 else ""
    if isinstance(patterns, str):
        what = (f"RosaConfig.{field}={patterns!r} matches no module of this model: a string is one regex matched "
                "against full module names (e.g. r'.*\\.query'); for name suffixes pass a list such as ['query']")
    else:
        missing = [p for p in patterns if not any(matches(n, [p]) for n in names)]
        what = (f"RosaConfig.{field} entry {', '.join(map(repr, missing))} matches no module of this model "
                "(each entry is an exact module name or a name suffix, and every entry must match)")
    return ValueError(f"{what}. Some module names that exist: {sample}{more}")


def _check_matches(field: str, patterns: Patterns, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The modules ``patterns`` matches; raises naming the regex, or each list entry, that matches nothing."""
    names = [n for n, _ in named]
    matched = [(n, m) for n, m in named if matches(n, patterns)]
    lists_miss = isinstance(patterns, (list, tuple)) and any(not any(matches(n, [p]) for n in names) for p in patterns)
    if not matched or lists_miss:
        raise _no_match_error(field, patterns, names)
    return matched


def find_targets(model: nn.Module, config: RosaConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that ``config`` adapts, in model order.

    ``target_modules=None`` takes the architecture preset, else :func:`rosa.presets.fallback_targets`
    (linear layers only, never the output layer). Layers inside the modules trained fully by
    default (:func:`rosa.presets.default_modules_to_save`) are never adapted. Raises ``ValueError``
    when an explicit pattern (or one entry of a list) matches nothing, or names only unsupported layers.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    patterns = config.target_modules
    preset = presets.preset_targets(model) if patterns is None else None
    if patterns is None and preset is None:
        linear = [(n, m) for n, m in named if layer_class_for(m) is RosaLinear]
        targets = presets.fallback_targets(model, linear)
        presets.log_fallback(model, len(targets))
        if not targets:
            raise ValueError(
                "RosaConfig.target_modules=None found no layer to adapt: without a preset for this architecture it "
                "adapts every linear layer (nn.Linear, transformers Conv1D) except the output layer, and this model "
                "has no other. Name the layers to adapt in target_modules"
            )
    else:
        wanted = patterns if patterns is not None else preset
        matched = (_check_matches("target_modules", patterns, named) if patterns is not None
                   else [(n, m) for n, m in named if matches(n, preset)])
        targets = [(n, m) for n, m in matched if is_supported(m)]
        if not targets:
            name, module = matched[0] if matched else ("(none)", None)
            raise ValueError(
                f"RosaConfig.target_modules={wanted!r} matches only layers ROSA cannot adapt, e.g. {name!r} "
                f"({type(module).__name__}); supported: {SUPPORTED_TYPES}"
            )
    heads = presets.default_modules_to_save(model) if config.modules_to_save is None else []
    targets = [(n, m) for n, m in targets if not any(n == h or n.startswith(h + ".") for h in heads)]
    kept = [(n, m) for n, m in targets if not matches(n, config.exclude_modules)]
    if not kept:
        raise ValueError(
            f"RosaConfig.exclude_modules={config.exclude_modules!r} excludes every target layer "
            f"({', '.join(n for n, _ in targets)}); nothing would be trained"
        )
    return kept


def find_modules_to_save(model: nn.Module, config: RosaConfig) -> list[nn.Module]:
    """The modules trained fully: ``modules_to_save``, or by default a classification model's head."""
    if config.modules_to_save is None:
        heads = presets.default_modules_to_save(model)
        if heads:
            logger.warning(
                "rosa: %s is a classification model, so its new head is trained fully: %s "
                "(RosaConfig.modules_to_save=None; pass a list to choose, [] for none)",
                type(model).__name__, ", ".join(heads),
            )
        return [model.get_submodule(name) for name in heads]
    if not config.modules_to_save:
        return []
    named = [(n, m) for n, m in model.named_modules() if n]
    return [m for _, m in _check_matches("modules_to_save", config.modules_to_save, named)]


def check_untied(model: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming both modules if module ``name`` shares its weight with another.

    Covers a module reachable under two names, a weight Parameter shared by two modules (e.g.
    ``lm_head.weight is embed_tokens.weight``), and Hugging Face models whose
    ``config.tie_word_embeddings`` ties the input and output embeddings. Adapting one side would
    silently untie them, or leave the other side computing with ``W_res``.
    """
    module = model.get_submodule(name)
    weight = module.weight
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other_name != name and (other is module or getattr(other, "weight", None) is weight):
            raise ValueError(
                f"layer {name!r} shares its weight with {other_name!r} (tied weights); adapting it would untie "
                f"them. Leave {name!r} out of RosaConfig.target_modules (or add it to exclude_modules), or untie the "
                "weights first"
            )
    pair = tied_embeddings(model)
    if pair is not None and name in pair:
        raise ValueError(
            f"layer {name!r} is one of the tied input/output embeddings {pair[0]!r} and {pair[1]!r} "
            "(config.tie_word_embeddings=True); adapting it would untie them. Leave it out of RosaConfig.target_modules "
            "(or add it to exclude_modules), or untie the model first (separate weights, tie_word_embeddings=False)"
        )


def tied_embeddings(model: nn.Module) -> Optional[tuple[str, str]]:
    """Names of the input and output embeddings that a Hugging Face config ties, or ``None``."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    try:
        pair = (model.get_input_embeddings(), model.get_output_embeddings())
    except (AttributeError, NotImplementedError):  # not a Hugging Face model, or one without word embeddings
        return None
    names = {id(m): n for n, m in model.named_modules()}
    if any(id(m) not in names for m in pair):
        return None
    return names[id(pair[0])], names[id(pair[1])]


def check_targets(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` naming the first of ``targets`` ROSA cannot adapt.

    Checks each weight (:func:`rosa.layers.check_weight`), the layer type's unsupported variants
    (e.g. an embedding with ``max_norm``) and tied weights.
    """
    for name, module in targets:
        check_weight(module.weight, name)
        layer_class_for(module).check_variant(module, name)
        check_untied(model, name)
