"""Resolve and load the pretrained models used by the experiments, offline.

The names of the bundled models (``"minilm"``, ``"smollm2"``, see :mod:`rosa.bundled`) map to
their local folders, so experiments and tests run without network access. Any other name is
handed to Hugging Face unchanged (a local folder or a hub id).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import bundled


def resolve_model_source(name_or_path: str) -> str:
    """Return the folder or hub id that ``from_pretrained`` should load for ``name_or_path``.

    ``"minilm"`` and ``"smollm2"`` map to local folders (building the SmolLM2
    cache on first use); anything else is returned unchanged.
    """
    if name_or_path in bundled.NAMES:
        return str(bundled.model_path(name_or_path))
    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"model folder {name_or_path} does not exist: pass an existing save_pretrained folder, "
            f"a hub id (namespace/name), or one of the bundled models {' / '.join(bundled.NAMES)}"
        )
    return name_or_path


def is_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a folder, never a hub id (``name`` or ``namespace/name``)."""
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


def load_tokenizer(name_or_path: str):
    """Load the tokenizer for ``name_or_path`` (alias, folder or hub id), with a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(name_or_path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequence_classifier(name_or_path: str, num_labels: int, **kwargs):
    """Load a sequence-classification model with a new ``num_labels`` head.

    ``num_labels=1`` means regression (e.g. STS-B).  Extra ``kwargs`` go to
    ``from_pretrained``.  ``config.pad_token_id`` is always set, so batches with
    padding work for decoder backbones too.
    """
    from transformers import AutoModelForSequenceClassification

    if num_labels == 1:
        kwargs.setdefault("problem_type", "regression")
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_source(name_or_path), num_labels=num_labels, **kwargs
    )
    _ensure_pad_token_id(model.config)
    return model


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load a causal language model in ``dtype``, with ``config.pad_token_id`` set."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(name_or_path), dtype=dtype)
    _ensure_pad_token_id(model.config)
    return model


def _ensure_pad_token_id(config) -> None:
    """Set ``pad_token_id`` to the (first) eos id when the config names no pad token."""
    if getattr(config, "pad_token_id", None) is not None:
        return
    eos = getattr(config, "eos_token_id", None)
    config.pad_token_id = eos[0] if isinstance(eos, list) else eos
