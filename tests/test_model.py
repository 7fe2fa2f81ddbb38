import pytest
import torch
from torch import nn

import rosa
from rosa.layers import RosaLayer
from rosa.model import factor_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict(
            {"query": nn.Linear(16, 16), "value": nn.Linear(16, 16), "ffn": nn.Linear(16, 32)}
        )
        self.norm = nn.LayerNorm(32)
        self.classifier = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.encoder["query"](x) + self.encoder["value"](x))
        return self.classifier(self.norm(self.encoder["ffn"](h)))


def fresh(seed=0):
    torch.manual_seed(seed)
    return Net()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def assert_unchanged(model, snap):
    state, flags = snap
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert not rosa.rosa_layers(model)


def test_wrap_freezes_and_counts_trainable_parameters_exactly():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=4, target_modules=["query", "value"]))
    layers = rosa.rosa_layers(model)
    assert set(layers) == {"encoder.query", "encoder.value"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"encoder.{m}.{f}" for m in ("query", "value") for f in ("up", "down")}
    report = rosa.parameter_report(model)
    assert report["trainable"] == 2 * 4 * (16 + 16)
    assert report["rho"] == pytest.approx((16 * 16 * 2) / (2 * 4 * 32))


def test_train_bias_and_modules_to_save_add_exactly_their_parameters():
    cfg = rosa.RosaConfig(rank=2, target_modules=["ffn"], train_bias=True, modules_to_save=["classifier"])
    model = rosa.wrap(fresh(), cfg)
    expected = 2 * (16 + 32) + 32 + (32 * 3 + 3)  # factors + ffn bias + classifier
    assert rosa.parameter_report(model)["trainable"] == expected


def test_regex_targets_and_exclusion():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=2, target_modules=r"encoder\..*", exclude_modules=["ffn"]))
    assert set(rosa.rosa_layers(model)) == {"encoder.query", "encoder.value"}


def test_default_targets_on_plain_model_adapt_every_linear_but_the_last():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=2))
    assert set(rosa.rosa_layers(model)) == {"encoder.query", "encoder.value", "encoder.ffn"}


def test_default_targets_never_adapt_convolutions_or_a_vit_head():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    assert set(rosa.rosa_layers(rosa.wrap(plain, rosa.RosaConfig(rank=2)))) == {"2"}
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    vit = rosa.wrap(ViTForImageClassification(config), rosa.RosaConfig(rank=2))
    names = set(rosa.rosa_layers(vit))
    assert len(names) == 6 and all(n.startswith("vit.layers.0.") for n in names), names  # no patch Conv2d, no classifier


def test_a_list_entry_that_matches_nothing_is_named_even_when_another_matches():
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules entry 'querry' matches no module"):
        rosa.wrap(model, rosa.RosaConfig(target_modules=["querry", "value"]))
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head' matches no module"):
        rosa.wrap(model, rosa.RosaConfig(target_modules=["value"], modules_to_save=["classifier", "head"]))
    with pytest.raises(ValueError, match=r"one regex matched against full module names.*\['query'\]"):
        rosa.wrap(model, rosa.RosaConfig(target_modules="query"))
    assert_unchanged(model, snap)


def test_exclusion_and_empty_fallback_errors_say_what_happened():
    with pytest.raises(ValueError, match=r"excludes every target layer \(encoder.query\); nothing would"):
        rosa.wrap(fresh(), rosa.RosaConfig(target_modules=["query"], exclude_modules=r"encoder\..*"))
    with pytest.raises(ValueError, match="except the output layer, and this model has no other") as info:
        rosa.wrap(nn.Sequential(nn.Linear(4, 2)), rosa.RosaConfig(rank=1))
    assert "exclude_modules" not in str(info.value)


def test_pattern_matching_nothing_lists_existing_names_and_leaves_model_untouched():
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        rosa.wrap(model, rosa.RosaConfig(target_modules=["q_proj"]))
    assert "matches no module" in str(info.value) and "encoder.query" in str(info.value)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="modules_to_save"):
        rosa.wrap(model, rosa.RosaConfig(target_modules=["query"], modules_to_save=["head"]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="cannot adapt"):
        rosa.wrap(model, rosa.RosaConfig(target_modules=["norm"]))
    assert_unchanged(model, snap)


def test_bad_weight_in_one_target_leaves_every_layer_untouched():
    model = fresh()
    with torch.no_grad():
        model.encoder["value"].weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="encoder.value"):
        rosa.wrap(model, rosa.RosaConfig(target_modules=["query", "value"]))
    state, flags = snap
    assert all(torch.equal(state[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]


def test_wrap_twice_is_refused():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=2))
    with pytest.raises(ValueError, match="already has ROSA layers"):
        rosa.wrap(model, rosa.RosaConfig(rank=2))


def test_gradients_flow_only_to_factors():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=3, target_modules=["query", "ffn"]))
    model(torch.randn(8, 16)).sum().backward()
    factors = {id(p) for p in factor_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in factors:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_gives_plain_model_with_same_outputs_after_training():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=3, target_modules=["query", "value", "ffn"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 16)
    for step in range(6):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 2:
            rosa.resample(model, opt)
    with torch.no_grad():
        expected = model(x)
    merged = rosa.merge(model)
    assert merged is model
    assert not any(isinstance(m, RosaLayer) for m in merged.modules())
    assert {type(m) for m in merged.encoder.values()} == {nn.Linear}
    assert not hasattr(merged, "rosa_config")
    with torch.no_grad():
        assert torch.allclose(merged(x), expected, rtol=1e-5, atol=1e-6)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_resample_clears_exactly_factor_state_and_keeps_parameter_identity(make_optimizer):
    cfg = rosa.RosaConfig(rank=3, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = rosa.wrap(fresh(), cfg)
    opt = make_optimizer(trainable(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 16)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    factors = factor_parameters(model)
    head = list(model.classifier.parameters())
    ids_before = [id(p) for p in trainable(model)]
    assert all(p in opt.state for p in factors + head)
    head_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in head}

    rosa.resample(model, opt)

    assert [id(p) for p in trainable(model)] == ids_before
    assert all(p not in opt.state for p in factors)
    for p in head:  # untouched state of non-factor parameters
        assert all(torch.equal(head_state[id(p)][k], v) for k, v in opt.state[p].items())
    lr = opt.param_groups[0]["lr"]
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    assert all(p in opt.state for p in factors)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5)


def test_resample_works_through_accelerate_wrapped_optimizer():
    from accelerate import Accelerator

    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=3, target_modules=["query"]))
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    inner = opt.optimizer
    assert all(p in inner.state for p in factor_parameters(model))
    rosa.resample(model, opt)
    assert all(p not in inner.state for p in factor_parameters(model))


def test_resample_without_rosa_layers_is_an_error():
    with pytest.raises(ValueError, match="rosa.wrap"):
        rosa.resample(fresh())


def test_resample_changes_subspace_but_not_function():
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=3, target_modules=["query"]))
    layer = rosa.rosa_layers(model)["encoder.query"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        before, up_before = model(x), layer.up.clone()
    rosa.resample(model)
    assert layer.resample_count == 1
    assert not torch.allclose(layer.up, up_before)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)


def test_print_trainable_parameters(capsys):
    model = rosa.wrap(fresh(), rosa.RosaConfig(rank=4, target_modules=["query", "value"]))
    report = rosa.print_trainable_parameters(model)
    line = capsys.readouterr().out
    assert f"trainable params: {report['trainable']:,}" in line and "rho: 2.00" in line


def test_default_targets_skip_embeddings_but_named_embeddings_are_adapted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    assert set(rosa.rosa_layers(rosa.wrap(model, rosa.RosaConfig(rank=2)))) == {"1"}
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8))
    assert set(rosa.rosa_layers(rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=["0"])))) == {"0"}


# -- faults: nothing changes ---------------------------------------------------------------------
def trained(seed=0):
    """A wrapped model and its AdamW after two steps (so the optimizer holds state)."""
    model = rosa.wrap(fresh(seed), rosa.RosaConfig(rank=3, target_modules=["query", "value", "ffn"]))
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def full_state(model, opt):
    """Weights, factors, resample counts and optimizer state, NaN-safe for torch.equal."""
    weights = {k: v.detach().clone().nan_to_num() for k, v in model.state_dict().items()}
    counts = {n: layer.resample_count for n, layer in rosa.rosa_layers(model).items()}
    moments = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(trainable(model))}
    return weights, counts, moments


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for i in a[2]:
        assert all(torch.equal(a[2][i][k], b[2][i][k]) for k in a[2][i])


def test_non_finite_factors_or_residual_refuse_resample_and_merge_changing_nothing():
    model, opt = trained()
    layers = rosa.rosa_layers(model)
    with torch.no_grad():
        layers["encoder.value"].up[0, :2] = float("nan")
        layers["encoder.ffn"].base.weight[3, 3] = float("inf")
    before = full_state(model, opt)
    with pytest.raises(rosa.NonFiniteError) as info:
        rosa.resample(model, opt)
    message = str(info.value)
    assert "encoder.value.up (2 non-finite)" in message and "encoder.ffn residual (1 non-finite)" in message
    assert "encoder.query" not in message and "nothing was changed" in message
    assert isinstance(info.value, ValueError)
    assert_same_state(full_state(model, opt), before)
    with pytest.raises(rosa.NonFiniteError, match="rosa.merge refused.*encoder.value.up"):
        rosa.merge(model)
    assert_same_state(full_state(model, opt), before)
    assert set(rosa.rosa_layers(model)) == {"encoder.query", "encoder.value", "encoder.ffn"}


def test_a_failed_svd_in_any_chunk_leaves_every_layer_count_and_optimizer_state_unchanged(monkeypatch):
    from rosa import model as rosa_model, subspace

    model, opt = trained()
    monkeypatch.setattr(rosa_model, "GROUP_BYTES", 16 * 16 * 4)  # one layer per chunk: query, value, then ffn
    before = full_state(model, opt)
    svd, calls = subspace.svd, []

    def failing_third(weight):
        calls.append(weight.shape)
        if len(calls) == 3:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(weight)

    monkeypatch.setattr(subspace, "svd", failing_third)
    with pytest.raises(torch.linalg.LinAlgError):
        rosa.resample(model, opt)
    assert len(calls) == 3
    assert_same_state(full_state(model, opt), before)
    monkeypatch.setattr(subspace, "svd", svd)
    rosa.resample(model, opt)  # the same call succeeds once the SVD does
    assert {layer.resample_count for layer in rosa.rosa_layers(model).values()} == {1}


def test_resample_refuses_an_optimizer_without_the_factors_or_a_non_optimizer():
    plain = fresh()
    early = torch.optim.AdamW(plain.parameters(), lr=1e-2)  # built before wrap: holds no factor
    model = rosa.wrap(plain, rosa.RosaConfig(rank=3, target_modules=["query"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds none of the ROSA factors.*build the optimizer after rosa.wrap"):
        rosa.resample(model, early)
    with pytest.raises(TypeError, match=r"expected a torch.optim.Optimizer .* got list"):
        rosa.resample(model, trainable(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert rosa.rosa_layers(model)["encoder.query"].resample_count == 0


def test_a_float32_residual_under_a_bf16_model_trains_resamples_and_merges_back_to_bf16():
    model = fresh().to(torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    cfg = rosa.RosaConfig(rank=3, target_modules=["query", "value", "ffn"], residual_dtype="float32")
    model = rosa.wrap(model, cfg)
    assert {layer.base.weight.dtype for layer in rosa.rosa_layers(model).values()} == {torch.float32}
    assert {layer.up.dtype for layer in rosa.rosa_layers(model).values()} == {torch.bfloat16}
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    model(x).float().pow(2).mean().backward()
    opt.step()
    rosa.resample(model, opt)
    with torch.no_grad():
        expected = model(x)
    merged = rosa.merge(model)
    assert {m.weight.dtype for m in merged.encoder.values()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.allclose(merged(x).float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_the_resample_count_travels_with_state_dict_and_fixes_the_next_draw(tmp_path):
    model, opt = trained()
    rosa.resample(model, opt)
    rosa.resample(model, opt)
    assert int(model.state_dict()["encoder.query.resamples"]) == 2
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = rosa.wrap(fresh(seed=1), rosa.RosaConfig(rank=3, target_modules=["query", "value", "ffn"]))
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    counts = [layer.resample_count for layer in rosa.rosa_layers(other).values()]
    assert counts == [2, 2, 2] and all(type(c) is int for c in counts)
    rosa.resample(model)
    rosa.resample(other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
