"""Tests for rosa.experiments.methods: ROSA, LoRA and full fine-tuning on the same targets."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("peft")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification  # noqa: E402

import rosa  # noqa: E402
from rosa.experiments.methods import (  # noqa: E402
    classifier_head,
    count_trainable,
    finalize_model,
    prepare_model,
)

RANK = 2


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=2,
                        pad_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


INPUTS = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def perturb_trainables(model) -> None:
    """Stand in for training: move every trainable parameter a little."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="rosa, lora, full"):
        prepare_model(tiny_bert(), "dora", RANK)
    with pytest.raises(ValueError, match="unknown method"):
        finalize_model(tiny_bert(), "adapter")


def test_classifier_head_names():
    assert classifier_head(tiny_bert()) == ["classifier", "bert.pooler"]
    assert classifier_head(tiny_gpt2()) == ["score"]
    assert classifier_head(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_rosa_and_lora_adapt_the_same_layers_with_equal_budgets(make):
    rosa_model = prepare_model(make(), "rosa", RANK, modules_to_save=classifier_head(make()))
    lora_model = prepare_model(make(), "lora", RANK, modules_to_save=classifier_head(make()))
    rosa_names = set(rosa.rosa_layers(rosa_model))
    from peft.tuners.lora import LoraLayer

    lora_names = {n.removeprefix("base_model.model.") for n, m in lora_model.named_modules()
                  if isinstance(m, LoraLayer)}
    assert rosa_names == lora_names and rosa_names
    assert count_trainable(rosa_model) == count_trainable(lora_model)
    heads = tuple(classifier_head(make()))
    trained = [n for n, p in rosa_model.named_parameters() if n.startswith(heads)]
    assert trained and all(p.requires_grad for n, p in rosa_model.named_parameters() if n.startswith(heads))


def test_rosa_singular_value_placement_reaches_every_layer():
    model = prepare_model(tiny_bert(), "rosa", RANK, singular_values="down")
    layers = rosa.rosa_layers(model).values()
    assert layers and all(layer.singular_values == "down" for layer in layers)
    for layer in layers:  # up holds orthonormal singular vectors: all of s is on down
        assert torch.allclose(layer.up.T @ layer.up, torch.eye(RANK), atol=1e-5)


def test_full_trains_everything():
    model = tiny_bert()
    model.requires_grad_(False)
    prepared = prepare_model(model, "full", RANK)
    assert count_trainable(prepared) == sum(p.numel() for p in prepared.parameters())
    assert finalize_model(prepared, "full") is prepared


@pytest.mark.parametrize("method", ["rosa", "lora"])
@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_finalize_returns_a_plain_model_with_the_same_function(make, method):
    model = prepare_model(make(), method, RANK, modules_to_save=classifier_head(make()))
    before = logits(model)
    perturb_trainables(model)
    trained = logits(model)
    assert not torch.allclose(before, trained)
    plain = finalize_model(model, method)
    assert type(plain) is type(make())
    assert not rosa.rosa_layers(plain)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(logits(plain), trained, atol=1e-5, rtol=1e-4)


def lora_scaling(model) -> float:
    from peft.tuners.lora import LoraLayer

    return next(m for m in model.modules() if isinstance(m, LoraLayer)).scaling["default"]


def test_lora_starts_at_the_pretrained_function_and_alpha_defaults_to_rank():
    base = logits(tiny_bert())
    model = prepare_model(tiny_bert(), "lora", RANK)
    torch.testing.assert_close(logits(model), base)
    assert lora_scaling(model) == 1.0
    model = prepare_model(tiny_bert(), "lora", RANK, lora_alpha=4 * RANK)
    assert lora_scaling(model) == 4.0
