"""Export a fine-tuned model as a standard Hugging Face PEFT LoRA adapter.

ROSA's accumulated update ``W_tuned - W_base`` has rank at most (resamples + 1) x R per layer, so a
merged ROSA model is exactly a LoRA adapter over its base model: one base serves many tasks.

What goes where in the adapter:

* a changed ``nn.Linear``, transformers ``Conv1D``, ``nn.Conv2d`` (``groups=1``, ``dilation=1``, zero
  padding) or ``nn.Embedding`` becomes a LoRA layer: its weight delta, SVD-truncated (``lora_alpha``
  equals the layer's rank, so the LoRA scale is 1; layers of other ranks go in ``rank_pattern`` /
  ``alpha_pattern``). A changed bias of such a layer becomes PEFT's ``lora_bias`` (``lora_B.bias``),
  which is per adapter, so adapters stay switchable.
* a layer whose LoRA would hold at least as many values as its weight (a delta of rank at least
  ``out * in / (out + in)``, half of the width for a square weight) is stored whole instead: smaller,
  and exact.
* every other changed module (LayerNorm, a task head, layers LoRA cannot express, and the names
  given in ``modules_to_save``) goes in PEFT's ``modules_to_save``: stored whole, exact.
* a change PEFT cannot express at all (tied weights, a parameter owned by a module that contains
  LoRA layers) raises ``ValueError``; nothing is written then.
* when most changed layers changed at near full rank (the base is not the model that was tuned, or
  the model was fully fine-tuned) the adapter would be about as large as the model: refused with
  ``ValueError`` stating the adapter's size against the base, unless ``allow_full_rank=True``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .. import presets
from ..config import Patterns, matches
from ..layers import RosaLayer, conv1d_type

ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
NOISE_FACTOR = 10.0  # rounding noise floor = NOISE_FACTOR * eps * rms(W) * (sqrt(out) + sqrt(in))
NEAR_FULL_RANK = 0.9  # a delta of rank >= NEAR_FULL_RANK * min(out, in) is "near full rank"

# Hugging Face model-class suffix -> PEFT task type
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
# PEFT task type -> name suffixes PEFT adds to modules_to_save by itself
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


# -- layer kinds ---------------------------------------------------------------------------------
def lora_kind(module: nn.Module) -> Optional[str]:
    """``linear``, ``conv1d``, ``conv2d`` or ``embedding`` when PEFT LoRA can express a change of ``module``'s weight."""
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        plain = module.groups == 1 and set(module.dilation) == {1} and module.padding_mode == "zeros"
        return "conv2d" if plain else None  # PEFT's LoRA convolutions ignore groups/dilation/padding_mode
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def dense(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A layer weight as the ``[out, in]`` matrix that LoRA factorizes."""
    if kind == "conv1d":
        return weight.T  # Conv1D stores [in, out]
    if kind == "conv2d":
        return weight.flatten(1)  # [out, in*kh*kw]
    return weight  # Linear [out, in]; Embedding [num_embeddings, dim]


def lora_tensors(kind: str, module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors (by name under the module) for ``delta = up @ down`` in ``[out, in]`` layout."""
    if kind == "embedding":  # PEFT: delta = (B @ A).T with A [r, num_embeddings], B [dim, r]
        return {"lora_embedding_A": up.T, "lora_embedding_B": down.T}
    if kind == "conv2d":
        return {"lora_A.weight": down.reshape(down.shape[0], *module.weight.shape[1:]), "lora_B.weight": up[:, :, None, None]}
    return {"lora_A.weight": down, "lora_B.weight": up}  # Conv1D too, with fan_in_fan_out=True


# -- low-rank truncation -------------------------------------------------------------------------
def noise_floor(weight: torch.Tensor) -> float:
    """Singular values of a delta below this are float rounding of ``weight`` ``[out, in]``, not training."""
    out_features, in_features = weight.shape
    rms = weight.double().norm().item() / math.sqrt(max(weight.numel(), 1))
    eps = torch.finfo(weight.dtype).eps
    return NOISE_FACTOR * eps * rms * (math.sqrt(out_features) + math.sqrt(in_features))


def choose_rank(s: torch.Tensor, delta_rank: int, rank: Optional[int], tolerance: Optional[float]) -> int:
    """The kept rank: ``rank``, or the smallest meeting ``tolerance``, never above ``delta_rank``."""
    if rank is not None:
        return min(rank, delta_rank)
    if tolerance is None:
        return delta_rank
    tail = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)]).sqrt()  # tail[r] = ||s[r:]||
    fits = (tail <= tolerance * tail[0]).nonzero()
    return min(int(fits[0]), delta_rank)


def truncate(
    delta: torch.Tensor, floor: float, rank: Optional[int] = None, tolerance: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``up [out, r]``, ``down [r, in]`` (float32) with ``up @ down`` the truncated SVD of ``delta``, and a report.

    The report: ``rank`` kept, ``delta_rank`` (singular values above ``floor``), ``relative_error``
    ``= ||delta - up @ down||_F / ||delta||_F``, and the ``discarded_singular_values`` above ``floor``.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    delta_rank = int((s > floor).sum())
    r = choose_rank(s, delta_rank, rank, tolerance)
    norm = s.norm().item()
    root = s[:r].sqrt()
    report = {
        "rank": r,
        "delta_rank": delta_rank,
        "relative_error": s[r:].norm().item() / norm if norm else 0.0,
        "discarded_singular_values": s[r:delta_rank].tolist(),
    }
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), report


# -- what changed --------------------------------------------------------------------------------
def _check_models(base_model: nn.Module, tuned_model: nn.Module) -> None:
    for label, model in (("base_model", base_model), ("tuned_model", tuned_model)):
        if any(isinstance(m, RosaLayer) for m in model.modules()):
            raise ValueError(f"{label} still has ROSA layers; call rosa.merge(model) first")
    base, tuned = base_model.state_dict(), tuned_model.state_dict()
    if base.keys() != tuned.keys():
        only_base, only_tuned = sorted(base.keys() - tuned.keys()), sorted(tuned.keys() - base.keys())
        raise ValueError(
            f"base and tuned models have different tensors (only in base: {only_base[:5]}, only in tuned: "
            f"{only_tuned[:5]}); load the base with the tuned model's class and config"
        )
    shapes = [f"{k}: {list(base[k].shape)} vs {list(tuned[k].shape)}" for k in base if base[k].shape != tuned[k].shape]
    if shapes:
        raise ValueError(f"base and tuned tensors differ in shape ({'; '.join(shapes[:5])}); LoRA cannot express that")


def changed_tensors(base_model: nn.Module, tuned_model: nn.Module) -> dict[str, list[str]]:
    """Owner module name -> local names of its parameters/buffers that differ between the two models.

    Raises ``ValueError`` when the models do not have the same tensors, or a changed tensor is tied.
    """
    _check_models(base_model, tuned_model)
    base = base_model.state_dict()
    tuned = tuned_model.state_dict(keep_vars=True)
    names_by_tensor: dict[int, list[str]] = {}
    for name, value in tuned.items():
        names_by_tensor.setdefault(id(value), []).append(name)
    changed: dict[str, list[str]] = {}
    for name, value in tuned.items():
        if torch.equal(value.detach(), base[name].to(value.device)):
            continue
        tied = names_by_tensor[id(value)]
        if len(tied) > 1:
            raise ValueError(
                f"tied tensors {tied} changed; a LoRA adapter applies to one module and would untie them. "
                "Untie the weights before training, or keep the merged model"
            )
        owner, _, local = name.rpartition(".")
        changed.setdefault(owner, []).append(local)
    return changed


# -- what goes where -----------------------------------------------------------------------------
def _save_reason(
    model: nn.Module, name: str, changed: list[str], target_modules: Patterns, modules_to_save: Patterns
) -> Optional[str]:
    """Why module ``name`` goes in ``modules_to_save`` rather than LoRA (``None``: it becomes LoRA)."""
    module = model.get_submodule(name)
    if matches(name, modules_to_save):
        return "listed in modules_to_save"
    if presets.is_head(model, name, module):
        return "task head"
    if lora_kind(module) is None:
        return f"PEFT LoRA cannot express a change of this {type(module).__name__}"
    if target_modules is not None and not matches(name, target_modules):
        return "not in target_modules"
    if "weight" not in changed:
        return "only its bias changed"
    if not set(changed) <= {"weight", "bias"}:
        return f"tensors other than weight and bias changed: {sorted(set(changed) - {'weight', 'bias'})}"
    return None


def _check_saved(model: nn.Module, saved: dict[str, str], lora: dict[str, str], changed: dict[str, list[str]]) -> None:
    """Raise ``ValueError`` unless PEFT's ``modules_to_save`` matching picks exactly ``saved`` and no LoRA layer."""
    names = [n for n, _ in model.named_modules()]
    for owner in saved:
        inside = [t for t in lora if owner == "" or t.startswith(owner + ".")]
        if owner == "" or inside:
            raise ValueError(
                f"{changed.get(owner)} of {owner or 'the root module'!r} changed, but that module contains LoRA "
                f"layers ({inside[:3]}); PEFT's modules_to_save would replace them. Nothing was written. Restrict "
                "target_modules so no LoRA layer sits inside it, or keep the merged model"
            )
        others = [n for n in names if n != owner and n.endswith(owner)]
        if others:
            raise ValueError(
                f"module {owner!r} must be saved whole, but PEFT matches modules_to_save by name suffix and "
                f"{owner!r} would also match {others[:3]}. Nothing was written; rename the module or keep the merged model"
            )


def _outermost(names: dict[str, str]) -> dict[str, str]:
    """``names`` without those inside another of them (saving the outer module covers them)."""
    return {n: why for n, why in names.items() if not any(n.startswith(o + ".") for o in names if o != n)}


def _task_heads(model: nn.Module, task: Optional[str]) -> dict[str, str]:
    """The modules PEFT itself puts in ``modules_to_save`` for ``task`` (their weights must be in the adapter)."""
    suffixes = TASK_HEADS.get(task)
    if not suffixes:
        return {}
    return {n: f"PEFT saves the {task} head itself" for n, _ in model.named_modules() if n and n.endswith(suffixes)}


def task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type for a Hugging Face model class (``SEQ_CLS``, ``CAUSAL_LM`` ...), or ``None``."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def _bias_delta(base: nn.Module, tuned: nn.Module, out_features: int) -> torch.Tensor:
    if tuned.bias is None:
        return torch.zeros(out_features)
    return (tuned.bias.detach().double().cpu() - base.bias.detach().double().cpu()).float()


# -- export --------------------------------------------------------------------------------------
def export_lora(
    base_model: nn.Module,
    tuned_model: nn.Module,
    out_dir: Union[str, os.PathLike],
    rank: Optional[int] = None,
    tolerance: Optional[float] = None,
    target_modules: Patterns = None,
    modules_to_save: Patterns = None,
    base_model_name_or_path: Optional[str] = None,
    allow_full_rank: bool = False,
) -> dict[str, Any]:
    """Write ``tuned_model - base_model`` as a PEFT LoRA adapter directory; returns a report.

    ``rank`` caps every layer's LoRA rank; ``tolerance`` picks the smallest rank whose relative
    Frobenius error is at most ``tolerance``; with neither, the export is exact (up to float
    rounding). ``target_modules`` / ``modules_to_save`` take the same pattern forms as
    ``RosaConfig``: which changed layers may become LoRA, and which are saved whole. Both models
    must be plain (``rosa.merge`` them first) and have the same tensors. When most changed layers
    changed at near full rank (a wrong base, or full fine-tuning) it raises ``ValueError`` and
    writes nothing, unless ``allow_full_rank``. Load the result with
    ``peft.PeftModel.from_pretrained(base, out_dir)``. The report has, per LoRA layer, ``shape``
    (``[out, in]``), ``rank``, ``delta_rank``, ``relative_error`` and ``discarded_singular_values``,
    plus ``modules_to_save`` (name -> reason), ``dropped`` (layers whose change is only float
    rounding), ``near_full_rank`` (changed layers of rank >= 0.9 min(out, in)),
    ``adapter_parameters`` (values in the adapter file) and ``base_parameters``.
    """
    _check_limits(rank, tolerance)
    changed = changed_tensors(base_model, tuned_model)
    if not changed:
        raise ValueError("tuned_model equals base_model; there is nothing to export")
    lora, saved = _split(tuned_model, changed, target_modules, modules_to_save)
    factors, layers, dropped = _factorize_all(base_model, tuned_model, lora, rank, tolerance)
    whole = _whole_when_smaller(layers)
    lora = {name: kind for name, kind in lora.items() if name not in whole}
    lora, saved, lora_bias = _settle(tuned_model, lora, {**saved, **whole}, dropped, changed)

    tensors = _adapter_tensors(base_model, tuned_model, lora, factors, lora_bias, saved)
    sizes = {
        "adapter_parameters": sum(t.numel() for t in tensors.values()),
        "base_parameters": sum(p.numel() for p in base_model.parameters()),
    }
    near_full_rank = _near_full_rank(layers)
    if 2 * len(near_full_rank) > len(layers) and not allow_full_rank:
        raise ValueError(_full_rank_message(near_full_rank, len(layers), sizes))
    if not lora:
        raise ValueError(
            f"no change can be expressed as LoRA ({len(saved)} modules would be saved whole, e.g. "
            f"{dict(list(saved.items())[:3])}); keep the merged model instead"
        )
    name_or_path = base_model_name_or_path or getattr(base_model, "name_or_path", None)
    config = _lora_config(tuned_model, lora, layers, saved, lora_bias, name_or_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return {
        "out_dir": str(out_dir),
        "r": config.r,
        "task_type": config.task_type,
        "lora_bias": lora_bias,
        "layers": {name: layers[name] for name in lora},
        "modules_to_save": saved,
        "dropped": dropped,
        "near_full_rank": near_full_rank,
        **sizes,
        "max_relative_error": max(layers[name]["relative_error"] for name in lora),
    }


def _whole_when_smaller(layers: dict[str, dict]) -> dict[str, str]:
    """Layers whose LoRA factors would hold at least as many values as the weight (name -> reason)."""
    whole = {}
    for name, info in layers.items():
        out_features, in_features = info["shape"]
        lora_size, weight_size = info["rank"] * (out_features + in_features), out_features * in_features
        if lora_size >= weight_size:
            whole[name] = (
                f"a rank-{info['rank']} LoRA would hold {lora_size} values, the [{out_features}, {in_features}] "
                f"weight {weight_size}: saved whole, exact"
            )
    return whole


def _near_full_rank(layers: dict[str, dict]) -> list[str]:
    """The layers whose delta has rank >= ``NEAR_FULL_RANK * min(out, in)``."""
    return [name for name, info in layers.items() if info["delta_rank"] >= NEAR_FULL_RANK * min(info["shape"])]


def _full_rank_message(near_full_rank: list[str], changed_layers: int, sizes: dict[str, int]) -> str:
    adapter, base = sizes["adapter_parameters"], sizes["base_parameters"]
    return (
        f"{len(near_full_rank)} of {changed_layers} changed layers changed at near full rank (e.g. "
        f"{near_full_rank[:3]}); the adapter would hold {adapter:,} values, {adapter / max(base, 1):.0%} of the "
        f"base model's {base:,} parameters. The base is probably not the model that was tuned (check it), or the "
        "model was fully fine-tuned (then keep the merged model: an adapter saves nothing). Nothing was written; "
        "pass allow_full_rank=True (rosa export-lora --allow-full-rank) to export anyway"
    )


def _split(
    model: nn.Module, changed: dict[str, list[str]], target_modules: Patterns, modules_to_save: Patterns
) -> tuple[dict[str, str], dict[str, str]]:
    """Changed modules that become LoRA (name -> kind) and those saved whole (name -> reason)."""
    lora, saved = {}, {}
    for owner, locals_ in changed.items():
        reason = _save_reason(model, owner, locals_, target_modules, modules_to_save)
        if reason is None:
            lora[owner] = lora_kind(model.get_submodule(owner))
        else:
            saved[owner] = reason
    return lora, saved


def _settle(
    model: nn.Module, lora: dict[str, str], saved: dict[str, str], dropped: dict[str, str], changed: dict[str, list[str]]
) -> tuple[dict[str, str], dict[str, str], bool]:
    """Final LoRA layers and saved modules, and whether ``lora_bias`` is needed, after the SVDs.

    A dropped layer (rounding-only weight change) with a changed bias is saved whole; so are
    embeddings when ``lora_bias`` is on (PEFT does not support it for them).
    """
    saved = dict(saved)
    for name in dropped:
        if "bias" in changed[name]:
            saved[name] = "weight change is only float rounding, bias changed"
    lora = {n: kind for n, kind in lora.items() if n not in dropped}
    lora_bias = any("bias" in changed[n] for n in lora)
    if lora_bias:
        for name in [n for n, kind in lora.items() if kind == "embedding"]:
            saved[name] = "PEFT's lora_bias (needed for other layers' bias changes) does not support embeddings"
            del lora[name]
    saved = _outermost({**_task_heads(model, task_type(model)), **saved})
    _check_saved(model, saved, lora, changed)
    return lora, saved, lora_bias


def _check_limits(rank: Optional[int], tolerance: Optional[float]) -> None:
    if rank is not None and tolerance is not None:
        raise ValueError("give rank or tolerance, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} is invalid: use an int >= 1")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0):
        raise ValueError(f"tolerance={tolerance!r} is invalid: use a relative error in [0, 1)")


def _factorize_all(
    base_model: nn.Module, tuned_model: nn.Module, lora: dict[str, str], rank: Optional[int], tolerance: Optional[float]
) -> tuple[dict, dict, dict]:
    """Per LoRA layer: factors, report; and the layers whose change is only rounding (name -> why)."""
    factors, layers, dropped = {}, {}, {}
    for name, kind in lora.items():
        tuned = dense(kind, tuned_model.get_submodule(name).weight.detach()).cpu()
        base = dense(kind, base_model.get_submodule(name).weight.detach()).cpu()
        floor = noise_floor(tuned)
        up, down, report = truncate(tuned.double() - base.double(), floor, rank, tolerance)
        if report["rank"] == 0:
            dropped[name] = f"weight change is below the float rounding noise floor {floor:.3g}"
            continue
        factors[name] = (up, down)
        layers[name] = {"kind": kind, "shape": list(tuned.shape), **report, "noise_floor": floor}
    return factors, layers, dropped


def _adapter_tensors(
    base_model: nn.Module,
    tuned_model: nn.Module,
    lora: dict[str, str],
    factors: dict,
    lora_bias: bool,
    saved: dict[str, str],
) -> dict[str, torch.Tensor]:
    """The adapter's safetensors content, keyed exactly as PEFT's ``save_pretrained`` writes it."""
    tensors = {}
    for name, kind in lora.items():
        module = tuned_model.get_submodule(name)
        up, down = factors[name]
        for suffix, tensor in lora_tensors(kind, module, up, down).items():
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = tensor.contiguous()
        if lora_bias:
            tensors[f"{KEY_PREFIX}{name}.lora_B.bias"] = _bias_delta(base_model.get_submodule(name), module, up.shape[0])
    for owner in saved:
        for local, tensor in tuned_model.get_submodule(owner).state_dict().items():
            tensors[f"{KEY_PREFIX}{owner}.{local}"] = tensor.detach().cpu().contiguous()
    return tensors


def _lora_config(
    model: nn.Module,
    lora: dict[str, str],
    layers: dict[str, dict],
    saved: dict[str, str],
    lora_bias: bool,
    base_model_name_or_path: Optional[str],
) -> Any:
    """A ``peft.LoraConfig`` with scale 1 everywhere: ``lora_alpha == r`` per layer."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("export_lora writes a PEFT adapter and needs peft: pip install 'rosa-peft[hf]'") from None
    ranks = {name: layers[name]["rank"] for name in lora}
    r = max(Counter(ranks.values()).most_common(), key=lambda item: (item[1], item[0]))[0]
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(lora),
        modules_to_save=sorted(saved) or None,
        lora_bias=lora_bias,
        fan_in_fan_out="conv1d" in lora.values(),
        lora_dropout=0.0,
        task_type=task_type(model),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
