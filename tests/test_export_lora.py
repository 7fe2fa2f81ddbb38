"""Export as a PEFT LoRA adapter: vanilla PEFT reproduces the tuned model; truncation error; adapter switching."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import rosa  # noqa: E402
from rosa.cli import main as cli_main  # noqa: E402
from rosa.integrations.export import ADAPTER_WEIGHTS, KEY_PREFIX, export_lora  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 6, 1]])




# -- vanilla PEFT side: nothing from rosa below this line until the next section --------------------
def peft_outputs(base: nn.Module, adapter_dir, inputs: dict) -> torch.Tensor:
    """Outputs of ``base`` with the adapter loaded by plain PEFT."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return output_of(model(**inputs))


def output_of(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model.eval()(**inputs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rtol * scale, (actual - expected).abs().max().item() / scale


# -- tuning with rosa -----------------------------------------------------------------------------------
def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Simulate training: random changes to every ROSA factor (and trainable bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * (param.abs().mean() + 0.02) * torch.randn(param.shape, generator=g))


def rosa_tune(base: nn.Module, config: rosa.RosaConfig, seed: int) -> nn.Module:
    """wrap, perturb, resample, perturb, merge: an update of rank up to 2R per layer."""
    tuned = rosa.wrap(copy.deepcopy(base), config)
    perturb(tuned, seed)
    rosa.resample(tuned)
    perturb(tuned, seed + 1)
    return rosa.merge(tuned)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=16, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


GPT2_ROSA = rosa.RosaConfig(rank=2, target_modules=["c_attn", "c_proj"], train_bias=True, seed=3)


@pytest.fixture(scope="module")
def gpt2_pair():
    base = tiny_gpt2()
    return base, rosa_tune(base, GPT2_ROSA, seed=1)


def delta_singular_values(base: nn.Module, tuned: nn.Module, name: str) -> torch.Tensor:
    w0, w1 = base.get_submodule(name).weight, tuned.get_submodule(name).weight
    return torch.linalg.svdvals(w1.detach().double() - w0.detach().double())


# -- tests ------------------------------------------------------------------------------------------------
def test_gpt2_conv1d_export_is_exact_in_vanilla_peft(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    report = export_lora(base, tuned, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True
    assert config["r"] == config["lora_alpha"] == 8  # up to 2R per subspace (both factors move), 2 subspaces
    assert sorted(config["target_modules"]) == sorted(rosa_layer_names(base))
    assert all(info["rank"] == info["delta_rank"] == 8 for info in report["layers"].values())
    assert report["max_relative_error"] < 1e-5
    assert_close(peft_outputs(base, tmp_path / "adapter", {"input_ids": IDS}), outputs(tuned, {"input_ids": IDS}))


def rosa_layer_names(base: nn.Module) -> list[str]:
    return [n for n, m in base.named_modules() if n.endswith(("attn.c_attn", "attn.c_proj", "mlp.c_proj"))]


def test_adapter_keys_and_shapes_match_peft_save_pretrained(tmp_path):
    """Our file against PEFT's own save_pretrained for the same config, on every supported layer kind."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 24)
            self.conv = nn.Conv2d(24, 20, 3, padding=1)
            self.lin = nn.Linear(20, 16)
            self.norm = nn.LayerNorm(16)

        def forward(self, ids):
            h = self.emb(ids).permute(0, 2, 1)[..., None]  # [B, 24, T, 1]
            h = self.conv(h)[..., 0].permute(0, 2, 1)  # [B, T, 20]
            return self.norm(self.lin(h))

    torch.manual_seed(0)
    base = Net()
    tuned = rosa_tune(base, rosa.RosaConfig(rank=1, target_modules=["emb", "conv", "lin"]), seed=4)
    with torch.no_grad():
        tuned.norm.weight.mul_(1.5)
    report = export_lora(base, tuned, tmp_path / "ours")
    assert report["modules_to_save"] == {"norm": "PEFT LoRA cannot express a change of this LayerNorm"}
    assert {n: i["kind"] for n, i in report["layers"].items()} == {"emb": "embedding", "conv": "conv2d", "lin": "linear"}

    reference = get_peft_model(copy.deepcopy(base), LoraConfig.from_pretrained(str(tmp_path / "ours")))
    reference.save_pretrained(str(tmp_path / "peft"))
    ours, theirs = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    inputs = {"ids": torch.tensor([[1, 2, 3, 9], [0, 5, 5, 7]])}
    assert_close(peft_outputs(base, tmp_path / "ours", inputs), outputs(tuned, inputs))


def test_truncated_export_error_is_the_discarded_singular_values(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    report = export_lora(base, tuned, tmp_path / "r1", rank=1)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "r1")).merge_and_unload()
    for name, info in report["layers"].items():
        s = delta_singular_values(base, tuned, name)
        expected = s[1:].norm() / s.norm()
        assert info["rank"] == 1
        assert info["relative_error"] == pytest.approx(expected.item(), rel=1e-9)
        assert info["discarded_singular_values"] == pytest.approx(s[1:8].tolist(), rel=1e-9)
        w0, w1, w = (m.get_submodule(name).weight.detach().double() for m in (base, tuned, merged))
        actual = (w - w1).norm() / (w1 - w0).norm()  # what PEFT really applies
        assert actual.item() == pytest.approx(expected.item(), rel=1e-3)


def test_tolerance_picks_the_smallest_rank_that_meets_it(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    report = export_lora(base, tuned, tmp_path / "tol", tolerance=0.3)
    for name, info in report["layers"].items():
        s = delta_singular_values(base, tuned, name)
        errors = [(s[r:].norm() / s.norm()).item() for r in range(len(s))]
        assert info["rank"] == next(r for r, e in enumerate(errors) if e <= 0.3)
        assert info["relative_error"] <= 0.3


def test_two_adapters_on_one_base_switch(tmp_path, gpt2_pair):
    base, tuned_a = gpt2_pair
    tuned_b = rosa_tune(base, GPT2_ROSA, seed=7)
    export_lora(base, tuned_a, tmp_path / "a")
    export_lora(base, tuned_b, tmp_path / "b")
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), adapter_name="a").eval()
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    inputs = {"input_ids": IDS}
    for name, tuned in (("b", tuned_b), ("a", tuned_a), ("b", tuned_b)):
        model.set_adapter(name)
        assert_close(outputs(model, inputs), outputs(tuned, inputs))
    assert not torch.allclose(outputs(tuned_a, inputs), outputs(tuned_b, inputs))


def test_cli_from_merged_folder_and_from_checkpoint(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "merged")
    wrapped = rosa.wrap(copy.deepcopy(base), GPT2_ROSA)
    perturb(wrapped, seed=11)
    rosa.resample(wrapped)
    perturb(wrapped, seed=12)
    rosa.save_checkpoint(tmp_path / "ckpt", wrapped)
    from_checkpoint = rosa.merge(wrapped)

    for source, expected in (("merged", tuned), ("ckpt", from_checkpoint)):
        out = tmp_path / f"adapter-{source}"
        assert cli_main(["export-lora", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / source), "--out", str(out)]) == 0
        assert json.loads((out / "export_report.json").read_text())["max_relative_error"] < 1e-5
        assert_close(peft_outputs(base, out, {"input_ids": IDS}), outputs(expected, {"input_ids": IDS}))


def test_refuses_what_lora_cannot_express(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    with pytest.raises(ValueError, match="rank or tolerance, not both"):
        export_lora(base, tuned, tmp_path / "x", rank=2, tolerance=0.1)
    with pytest.raises(ValueError, match="still has ROSA layers"):
        export_lora(base, rosa.wrap(copy.deepcopy(base), GPT2_ROSA), tmp_path / "x")
    tied = copy.deepcopy(tuned)
    with torch.no_grad():
        tied.transformer.wte.weight[3] += 1.0
    with pytest.raises(ValueError, match=r"tied tensors \['transformer.wte.weight', 'lm_head.weight'\] changed"):
        export_lora(base, tied, tmp_path / "x")
    with pytest.raises(ValueError, match="equals base_model"):
        export_lora(base, copy.deepcopy(base), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_parameter_of_a_module_holding_lora_layers_is_refused(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4))
    base.register_parameter("scale", nn.Parameter(torch.ones(4)))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight[0, 0] += 1.0
        tuned.scale.mul_(2.0)
    with pytest.raises(ValueError, match=r"\['scale'\] of 'the root module' changed, but that module contains LoRA layers"):
        export_lora(base, tuned, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_rounding_only_changes_are_dropped(tmp_path, gpt2_pair):
    base, tuned = gpt2_pair
    nudged = copy.deepcopy(tuned)
    weight = nudged.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(9.0))
    report = export_lora(base, nudged, tmp_path / "adapter")
    assert list(report["dropped"]) == ["transformer.h.0.mlp.c_fc"]
    assert "transformer.h.0.mlp.c_fc" not in report["layers"]


def test_sequence_classifier_with_an_unchanged_head(tmp_path):
    """PEFT adds the SEQ_CLS head to modules_to_save by itself, so the adapter must carry it even unchanged."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    base = BertForSequenceClassification(config).eval()
    tuned = rosa_tune(base, rosa.RosaConfig(rank=1, modules_to_save=[]), seed=5)  # delta rank <= 4; the head stays frozen
    report = export_lora(base, tuned, tmp_path / "adapter")
    assert report["task_type"] == "SEQ_CLS"
    assert report["modules_to_save"] == {"classifier": "PEFT saves the SEQ_CLS head itself"}
    assert_close(peft_outputs(base, tmp_path / "adapter", {"input_ids": IDS}), outputs(tuned, {"input_ids": IDS}))


@pytest.mark.real_model
def test_minilm_export_reproduces_the_tuned_classifier_in_vanilla_peft(tmp_path):
    from rosa.experiments.models import load_sequence_classifier

    torch.manual_seed(0)
    base = load_sequence_classifier("minilm", 2).eval()
    tuned = rosa_tune(base, rosa.RosaConfig(rank=4, seed=1, modules_to_save=["classifier"]), seed=2)
    with torch.no_grad():
        tuned.bert.encoder.layer[0].attention.output.LayerNorm.weight.mul_(1.1)
    report = export_lora(base, tuned, tmp_path / "adapter")
    assert set(report["modules_to_save"]) == {"classifier", "bert.encoder.layer.0.attention.output.LayerNorm"}
    assert len(report["layers"]) == 24 and all(i["rank"] == 16 for i in report["layers"].values())
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 2307, 102], [101, 2023, 2003, 1037, 3231, 102]])}
    assert_close(peft_outputs(base, tmp_path / "adapter", inputs), outputs(tuned, inputs))


# -- size guards: whole modules when LoRA is no smaller, refusal when most layers changed at full rank ---------
def add_rank_k_delta(model: nn.Module, name: str, k: int, seed: int) -> None:
    """Add a random update of rank exactly ``k`` to ``name``'s weight."""
    g = torch.Generator().manual_seed(seed)
    weight = model.get_submodule(name).weight
    a, b = torch.randn(weight.shape[0], k, generator=g), torch.randn(k, weight.shape[1], generator=g)
    with torch.no_grad():
        weight.add_(0.02 * a @ b)


@pytest.mark.parametrize("k, whole", [(15, False), (16, True), (32, True)])
def test_a_layer_whose_lora_is_no_smaller_is_saved_whole(tmp_path, gpt2_pair, k, whole):
    base, _ = gpt2_pair
    tuned = copy.deepcopy(base)
    add_rank_k_delta(tuned, "transformer.h.0.attn.c_proj", k, seed=1)  # [32, 32]: k * 64 >= 1024 from k = 16 on
    add_rank_k_delta(tuned, "transformer.h.1.attn.c_proj", 2, seed=2)
    report = export_lora(base, tuned, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    key = f"{KEY_PREFIX}transformer.h.0.attn.c_proj"
    assert ("transformer.h.0.attn.c_proj" in report["modules_to_save"]) == whole
    assert (f"{key}.weight" in tensors) == whole and (f"{key}.lora_A.weight" in tensors) == (not whole)
    if whole:
        assert torch.equal(tensors[f"{key}.weight"], tuned.transformer.h[0].attn.c_proj.weight)
        assert report["modules_to_save"]["transformer.h.0.attn.c_proj"].startswith(f"a rank-{k} LoRA would hold {k * 64} values")
    else:
        assert report["layers"]["transformer.h.0.attn.c_proj"]["rank"] == k
    assert report["adapter_parameters"] == sum(t.numel() for t in tensors.values())
    assert report["base_parameters"] == sum(p.numel() for p in base.parameters())
    assert_close(peft_outputs(base, tmp_path / "adapter", {"input_ids": IDS}), outputs(tuned, {"input_ids": IDS}))


def tiny_bert_classifier(seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(config).eval()


def test_a_tuned_model_over_another_base_is_refused_with_the_adapter_size(tmp_path):
    base, unrelated = tiny_bert_classifier(0), tiny_bert_classifier(1)
    with pytest.raises(ValueError, match=r"changed at near full rank .* of the base model's [\d,]+ parameters.*allow_full_rank=True"):
        export_lora(base, unrelated, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_allow_full_rank_exports_what_most_layers_changed_at_full_rank(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    base = Net()
    tuned = copy.deepcopy(base)
    add_rank_k_delta(tuned, "a", 16, seed=1)
    add_rank_k_delta(tuned, "b", 15, seed=2)
    add_rank_k_delta(tuned, "c", 2, seed=3)
    with pytest.raises(ValueError, match=r"2 of 3 changed layers changed at near full rank \(e.g. \['a', 'b'\]\)"):
        export_lora(base, tuned, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = export_lora(base, tuned, tmp_path / "adapter", allow_full_rank=True)
    assert report["near_full_rank"] == ["a", "b"] and set(report["modules_to_save"]) == {"a", "b"}
    x = {"x": torch.randn(3, 16)}
    assert_close(peft_outputs(base, tmp_path / "adapter", x), outputs(tuned, x))


def test_cli_refuses_a_wrong_base_and_bad_limits_in_one_line(tmp_path, capsys):
    tiny_bert_classifier(0).save_pretrained(tmp_path / "base")
    tiny_bert_classifier(1).save_pretrained(tmp_path / "other")
    command = ["export-lora", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "other"), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match=r"^rosa export-lora: \d+ of \d+ changed layers changed at near full rank"):
        cli_main(command)
    assert not (tmp_path / "x").exists()
    for option, value, expected in (("--rank", "0", "integer >= 1"), ("--tolerance", "1.5", "relative error in [0, 1)"),
                                    ("--rank", "two", "integer >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(command + [option, value])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"argument {option}: {value!r} is not a" in error and expected in error
