"""Default target modules per architecture, used when ``RosaConfig.target_modules`` is None."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

logger = logging.getLogger("rosa")

# Hugging Face ``config.model_type`` -> module-name suffixes of the attention projections,
# the layers the paper adapts.
ATTENTION_PRESETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}

# Names of task heads that a fallback never adapts (they are usually trained fully or kept).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")
# Top-level module names of the new heads of Hugging Face ``*ForSequenceClassification`` and
# ``*ForTokenClassification`` models.
CLASSIFIER_HEADS = ("classifier", "score")
# Hugging Face class-name endings whose head :func:`default_modules_to_save` trains, as PEFT's
# SEQ_CLS and TOKEN_CLS task types do.
CLASSIFIER_CLASSES = ("ForSequenceClassification", "ForTokenClassification")


def model_type(model: nn.Module) -> Optional[str]:
    """The Hugging Face ``config.model_type`` of ``model``, or ``None`` for a plain PyTorch module."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def preset_targets(model: nn.Module) -> Optional[list[str]]:
    """Target suffixes for a known architecture, or ``None`` when there is no preset."""
    kind = model_type(model)
    return list(ATTENTION_PRESETS[kind]) if kind in ATTENTION_PRESETS else None


def classifier_head(model: nn.Module) -> list[str]:
    """Names of the modules between the backbone and the task output, trained fully by adapters.

    The new head (``classifier`` or ``score``) and, in BERT-style classifiers, the pooler that feeds
    it ``[CLS]`` (e.g. ``bert.pooler``). Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were
    fine-tuned through mean pooling, which never reaches the pooler, so frozen it hands the head a
    feature that fine-tuning never shaped.
    """
    children = dict(model.named_children())
    head = [name for name in CLASSIFIER_HEADS if name in children][:1]
    if not head:
        return []
    poolers = [name for name, _ in model.named_modules() if name.count(".") == 1 and name.endswith(".pooler")]
    return head + poolers


def default_modules_to_save(model: nn.Module) -> list[str]:
    """What ``modules_to_save=None`` trains fully: a Hugging Face sequence- or token-classification
    model's :func:`classifier_head`, else nothing."""
    if not type(model).__name__.endswith(CLASSIFIER_CLASSES):
        return []
    return classifier_head(model)


def is_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether ``module`` is the model's output head (never adapted by the fallback)."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is module:
        return True
    return name.split(".")[0] in HEAD_NAMES and model_type(model) is not None


def fallback_targets(model: nn.Module, linear: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The layers ``target_modules=None`` adapts on a model without a preset: of ``linear`` (its
    ``nn.Linear``/``Conv1D`` layers, in module order), all but the output layer.

    The output layer of a Hugging Face model is its output embeddings or a task head (a top-level
    module named as in ``HEAD_NAMES``); of a plain ``nn.Module``, its last linear layer in module
    order. Convolutions and embeddings are adapted only when named in ``target_modules``.
    """
    if model_type(model) is None:
        return linear[:-1]
    return [(n, m) for n, m in linear if not is_head(model, n, m)]


def log_fallback(model: nn.Module, count: int) -> None:
    """Log that an unknown architecture got the linear-layer fallback of :func:`fallback_targets`."""
    kind = model_type(model) or type(model).__name__
    logger.info(
        "rosa: no target preset for %r; adapting every linear layer except the output layer (%d layers; for a "
        "plain nn.Module the output layer is its last nn.Linear). Pass RosaConfig(target_modules=...) to choose.",
        kind,
        count,
    )
