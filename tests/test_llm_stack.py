"""ROSA in the LLM fine-tuning stack: TRL's SFTTrainer and DPOTrainer with RosaCallback, gradient
checkpointing (reentrant and not), and torch.compile graphs that survive a resample."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import rosa  # noqa: E402
from rosa.integrations import RosaCallback  # noqa: E402

WORDS = ["name", "food", "area", "price", "is", "a", "the", "pub", "cheap", "centre", "it", "serves"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s> ' + message['role'] + ' : ' + message['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant : ' }}{% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS and the roles, with a chat template and a pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", ":", "user", "assistant", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(config)


def wrapped_llama(vocab: int) -> LlamaForCausalLM:
    return rosa.wrap(tiny_llama(vocab), rosa.RosaConfig(rank=2, seed=0, target_modules=["q_proj", "v_proj", "down_proj"]))


def chats(n: int) -> Dataset:
    """``n`` conversations cycling through 3 fixed ones, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(0)
    fixed = []
    for _ in range(3):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g)]
        fixed.append({"messages": [{"role": "user", "content": " ".join(words[:3])},
                                   {"role": "assistant", "content": " ".join(words[3:])}]})
    return Dataset.from_list([fixed[i % 3] for i in range(n)])


def trl_config(config_class: type, tmp_path, **overrides):
    """``config_class`` (a TRL trainer config) for a few quick CPU steps, logging every step, saving nothing."""
    settings = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-2,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, max_length=32,
                    dataloader_num_workers=0, disable_tqdm=True)
    return config_class(**{**settings, **overrides})


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["no-checkpointing", "reentrant", "non-reentrant"])
def test_sft_trainer_trains_and_resamples_rosa_factors(tmp_path, checkpointing):
    tok = tokenizer()
    model = wrapped_llama(len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = RosaCallback(every_steps=2)
    args = trl_config(trl.SFTConfig, tmp_path, activation_checkpointing=checkpointing is not None,
                      activation_checkpointing_kwargs=checkpointing)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chats(24), processing_class=tok,
                             callbacks=[callback])
    trainer.train()
    assert callback.resample_steps == [2, 4]  # none after the last step
    assert all(layer.resample_count == 2 for layer in rosa.rosa_layers(model).values())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # every factor moved: gradients reached every layer through the checkpointed blocks
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def preferences(n: int) -> Dataset:
    """``n`` prompt/chosen/rejected triples cycling through 3 fixed ones (plain strings)."""
    g = torch.Generator().manual_seed(1)
    fixed = []
    for _ in range(3):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (9,), generator=g)]
        fixed.append({"prompt": " ".join(words[:3]), "chosen": " ".join(words[3:6]), "rejected": " ".join(words[6:])})
    return Dataset.from_list([fixed[i % 3] for i in range(n)])


def test_dpo_trainer_trains_and_resamples_rosa_factors_against_a_frozen_merged_reference(tmp_path):
    """DPOTrainer takes the same RosaCallback as SFTTrainer, with the reference passed as a merged plain
    copy of the wrapped model: ``ref_model=rosa.merge(copy.deepcopy(model))``. Left out, DPOTrainer loads
    the reference again from ``model.config.name_or_path`` (a model built from a config has none)."""
    tok = tokenizer()
    model = wrapped_llama(len(tok))
    ref_model = rosa.merge(copy.deepcopy(model))
    assert not rosa.rosa_layers(ref_model)
    ref_before = {n: p.detach().clone() for n, p in ref_model.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = RosaCallback(every_steps=2)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=trl_config(trl.DPOConfig, tmp_path),
                             train_dataset=preferences(24), processing_class=tok, callbacks=[callback])
    trainer.train()
    assert callback.resample_steps == [2, 4]
    assert all(layer.resample_count == 2 for layer in rosa.rosa_layers(model).values())
    assert [e["step"] for e in trainer.state.log_history if "rosa/resamples" in e] == [2, 4]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # before the first update the policy and the merged reference agree, so the DPO loss is log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    # the reference stayed plain and frozen: no factors, every weight as it was
    assert trainer.ref_model is ref_model and not rosa.rosa_layers(trainer.ref_model)
    assert all(torch.equal(p, ref_before[n]) for n, p in ref_model.state_dict().items())


def test_gradient_checkpointing_gives_the_same_factor_gradients(tmp_path):
    tok = tokenizer()
    ids = tok([" ".join(WORDS)] * 2, return_tensors="pt")["input_ids"]
    grads = []
    for kwargs in (None, {"use_reentrant": True}, {"use_reentrant": False}):
        model = wrapped_llama(len(tok))
        if kwargs is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in rosa.model.factor_parameters(model)])
    for other in grads[1:]:
        assert all(g is not None for g in other)
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compiled_model_keeps_its_graphs_across_resamples():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tok = tokenizer()
    model = wrapped_llama(len(tok))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tok([" ".join(WORDS)] * 2, return_tensors="pt")["input_ids"]
    for step in range(4):
        loss = compiled(input_ids=ids, labels=ids).loss
        # the compiled graph computes with the current subspace, resampled or not
        torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            frames = counter.frame_count
            assert frames > 0
        if step % 2 == 0:
            rosa.resample(model, optimizer)
    assert counter.frame_count == frames  # no recompilation after resamples


def test_callback_enables_input_grads_for_reentrant_checkpointing_of_a_vision_model(tmp_path):
    # transformers enables input grads itself only for input_ids models; without it this raises
    # "element 0 of tensors does not require grad"
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=16, num_labels=2)
    model = rosa.wrap(ViTForImageClassification(config), rosa.RosaConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 1, 8, 8).tolist(), "labels": [0, 1] * 4})
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True},
                             save_strategy="no", disable_tqdm=True)
    before = [p.detach().clone() for p in rosa.model.factor_parameters(model)]
    Trainer(model=model, args=args, train_dataset=data.with_format("torch"), callbacks=[RosaCallback(every_steps=5)]).train()
    assert all(not torch.equal(a, b) for a, b in zip(before, rosa.model.factor_parameters(model)))
