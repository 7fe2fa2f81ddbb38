"""RosaConv2d and RosaEmbedding: function preservation, float64 gradients, merge, ties, rejected variants."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import rosa
from helpers import rel_err
from rosa.layers import RosaConv2d, RosaEmbedding, is_supported, layer_class_for

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_setups(draw):
    """A Conv2d (random hyper-parameters, incl. groups) and an input it accepts."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.integers(1, 3))
    padding = draw(st.sampled_from([0, 1, 2, (1, 0)] + (["same"] if stride == 1 else [])))
    conv = nn.Conv2d(
        groups * draw(st.integers(1, 3)),
        groups * draw(st.integers(1, 3)),
        kernel,
        stride=stride,
        padding=padding,
        dilation=draw(st.integers(1, 2)),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
    )
    out, cols = conv.weight.flatten(1).shape
    rank = draw(st.integers(1, min(out, cols)))
    x = torch.randn(2, conv.in_channels, 8, 7)
    return conv, rank, x


@given(setup=conv_setups(), selection=st.sampled_from(["random", "block", "top", "bottom"]), seed=st.integers(0, 3))
def test_conv_wrap_resample_merge_preserve_function(setup, selection, seed):
    conv, rank, x = setup
    expected = conv(x).detach()
    layer = RosaConv2d(copy.deepcopy(conv), rank, name="conv", selection=selection, seed=seed)
    assert layer.up.shape == (conv.out_channels, rank)
    assert layer.down.shape == (rank, conv.weight[0].numel())
    assert rel_err(layer(x).detach(), expected) <= 1e-5
    layer.resample()
    assert rel_err(layer(x).detach(), expected) <= 1e-5
    merged = layer.merge()
    assert type(merged) is nn.Conv2d
    assert rel_err(merged(x).detach(), expected) <= 1e-5
    assert rel_err(merged.weight, conv.weight) <= 1e-5


@given(
    num=st.integers(1, 30),
    dim=st.integers(1, 12),
    selection=st.sampled_from(["random", "block", "top", "bottom"]),
    data=st.data(),
)
def test_embedding_wrap_resample_merge_preserve_function_and_padding_row(num, dim, selection, data):
    padding_idx = data.draw(st.one_of(st.none(), st.integers(-num, num - 1)))
    rank = data.draw(st.integers(1, min(num, dim)))
    emb = nn.Embedding(num, dim, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.normal_()  # a non-zero padding row too: it must still come back bit for bit
    ids = torch.randint(0, num, (3, 5))
    expected = emb(ids).detach()
    layer = RosaEmbedding(copy.deepcopy(emb), rank, name="emb", selection=selection)
    pad = emb.padding_idx  # normalized to >= 0 by nn.Embedding

    def check(module: nn.Module) -> None:
        out = module(ids).detach()
        assert rel_err(out, expected) <= 1e-5
        if pad is not None:
            assert torch.equal(module(torch.tensor([pad])).detach()[0], emb.weight[pad])

    check(layer)
    layer.resample()
    check(layer)
    merged = layer.merge()
    assert type(merged) is nn.Embedding and merged.padding_idx == pad
    check(merged)
    if pad is not None:
        assert torch.equal(merged.weight[pad], emb.weight[pad])


def perturbed(layer: nn.Module) -> nn.Module:
    """The layer in float64 with its factors moved away from the factorization (as after training)."""
    layer = layer.double()
    with torch.no_grad():
        layer.up.add_(0.3 * torch.randn_like(layer.up))
        layer.down.add_(0.3 * torch.randn_like(layer.down))
    return layer


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(stride=2, padding=1, dilation=2),
        dict(padding="same", padding_mode="reflect"),
        dict(groups=2, padding=1, padding_mode="circular"),
        dict(groups=4, padding=(0, 1), bias=False),  # depthwise
    ],
)
def test_conv_factor_gradients_match_float64_reference(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, (3, 2), **options)
    layer = perturbed(RosaConv2d(conv, 3, name="conv"))
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    out = layer(x)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad((out * grad_out).sum(), [layer.up, layer.down])

    # reference: a plain Conv2d whose kernel is the explicit float64 sum W_res + up @ down
    up, down = layer.up.detach().clone().requires_grad_(), layer.down.detach().clone().requires_grad_()
    kernel = (layer.base.weight.flatten(1) + up @ down).view_as(layer.base.weight)  # [out, in/groups, kh, kw]
    ref = functional_call(layer.base, {"weight": kernel, "bias": layer.base.bias}, (x,))
    assert rel_err(out.detach(), ref.detach()) <= 1e-12
    expected = torch.autograd.grad((ref * grad_out).sum(), [up, down])
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-10


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_factor_gradients_match_float64_reference(padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6, padding_idx=padding_idx)
    layer = perturbed(RosaEmbedding(emb, 4, name="emb"))
    if padding_idx is not None:
        with torch.no_grad():
            layer.up[padding_idx] = 0  # the layer's invariant, restored after the perturbation
    ids = torch.tensor([[3, 1, 1, 7], [3, 0, 11, 1]])
    out = layer(ids)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad((out * grad_out).sum(), [layer.up, layer.down])

    # reference: nn.Embedding semantics on the explicit float64 table W_res + up @ down
    up, down = layer.up.detach().clone().requires_grad_(), layer.down.detach().clone().requires_grad_()
    table = layer.base.weight + up @ down  # [num, dim]
    ref = F.embedding(ids, table, padding_idx)
    assert rel_err(out.detach(), ref.detach()) <= 1e-12
    expected = torch.autograd.grad((ref * grad_out).sum(), [up, down])
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-10
    if padding_idx is not None:
        assert torch.count_nonzero(got[0][padding_idx]) == 0


class TinyNet(nn.Module):
    """Embedding -> reshape to an image -> Conv2d -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).view(ids.shape[0], 4, 2, 2)  # ids [B] -> [B, 4, 2, 2]
        return self.head(torch.relu(self.conv(h)).flatten(1))


def test_wrap_train_resample_merge_by_name_returns_plain_layers():
    torch.manual_seed(0)
    model = TinyNet()
    original = copy.deepcopy(model)
    ids = torch.tensor([0, 3, 7, 19, 0, 5])
    rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=["embed", "conv"], modules_to_save=["head"]))
    assert isinstance(model.embed, RosaEmbedding) and isinstance(model.conv, RosaConv2d)
    assert rosa.parameter_report(model)["factor_parameters"] == 2 * (20 + 16) + 2 * (6 + 4 * 9)
    assert rel_err(model(ids).detach(), original(ids).detach()) <= 1e-5

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    factors = [model.embed.up, model.embed.down, model.conv.up, model.conv.down]
    model(ids).square().sum().backward()
    optimizer.step()
    trained = model(ids).detach()
    assert rosa.resample(model, optimizer) == 2
    assert [model.embed.up, model.embed.down, model.conv.up, model.conv.down] == factors  # same objects
    assert all(p not in optimizer.state for p in factors)
    assert rel_err(model(ids).detach(), trained) <= 1e-5

    rosa.merge(model)
    assert type(model.embed) is nn.Embedding and type(model.conv) is nn.Conv2d
    assert rel_err(model(ids).detach(), trained) <= 1e-5
    assert torch.equal(model.embed.weight[0], original.embed.weight[0])  # the padding row never moved


def test_depthwise_conv_is_adapted_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # depthwise with channel multiplier 2
    x = torch.randn(1, 6, 5, 5)
    layer = RosaConv2d(copy.deepcopy(conv), 5, name="dw")
    assert layer.down.shape == (5, 9)
    with torch.no_grad():
        layer.up.normal_()  # an arbitrary update must stay within each group, as in the merged kernel
    merged = copy.deepcopy(layer).merge()
    assert rel_err(layer(x).detach(), merged(x).detach()) <= 1e-5


def test_conv_dropout_acts_on_adapter_input_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    layer = RosaConv2d(copy.deepcopy(conv), 2, name="c", dropout=0.5)
    layer.eval()
    assert rel_err(layer(x).detach(), conv(x).detach()) <= 1e-5
    layer.train()
    assert rel_err(layer(x).detach(), conv(x).detach()) > 1e-3


def test_registry_covers_conv2d_and_embedding_only():
    assert layer_class_for(nn.Conv2d(2, 2, 1)) is RosaConv2d
    assert layer_class_for(nn.Embedding(3, 2)) is RosaEmbedding
    assert not is_supported(nn.Conv1d(2, 2, 1))
    assert not is_supported(nn.ConvTranspose2d(2, 2, 1))
    assert rosa.RosaConv2d is RosaConv2d and rosa.RosaEmbedding is RosaEmbedding


def assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not rosa.rosa_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "options, message",
    [(dict(max_norm=1.0), "max_norm"), (dict(sparse=True), "sparse"), (dict(scale_grad_by_freq=True), "scale_grad")],
)
def test_unsupported_embedding_variants_rejected_before_anything_changes(options, message):
    model = nn.Sequential(nn.Embedding(10, 4, **options), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match=rf"'0'.*{message}"):
        rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=["1", "0"]))
    assert_untouched(model, reference)
    with pytest.raises(ValueError, match=message):
        RosaEmbedding(nn.Embedding(10, 4, **options), 2, name="emb")


class TiedLM(nn.Module):
    """A language-model shape: input embedding, a body, an output head tied (or not) to the embedding."""

    def __init__(self, share_weight: bool, config_ties: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=config_ties)
        self.embed_tokens = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if share_weight:
            self.lm_head.weight = self.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


@pytest.mark.parametrize("share_weight, config_ties", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_embeddings_are_refused_naming_both_modules(share_weight, config_ties, target):
    model = TiedLM(share_weight, config_ties)
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="tied") as error:
        rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=["body", target]))
    assert "'embed_tokens'" in str(error.value) and "'lm_head'" in str(error.value)
    assert_untouched(model, reference)


def test_untied_embeddings_and_untied_config_are_adapted():
    model = TiedLM(share_weight=False, config_ties=False)
    rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=["embed_tokens", "lm_head"]))
    assert set(rosa.rosa_layers(model)) == {"embed_tokens", "lm_head"}


def test_module_shared_under_two_names_is_refused():
    conv = nn.Conv2d(2, 2, 3)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    with pytest.raises(ValueError, match="'0' shares its weight with '2'"):
        rosa.wrap(model, rosa.RosaConfig(rank=1, target_modules=["0"]))
    assert not rosa.rosa_layers(model)


def test_tied_hugging_face_llama_embeddings_are_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    for target in ("embed_tokens", "lm_head"):
        with pytest.raises(ValueError, match="'model.embed_tokens'.*'lm_head'|'lm_head'.*'model.embed_tokens'"):
            rosa.wrap(model, rosa.RosaConfig(rank=2, target_modules=[target]))
    assert not rosa.rosa_layers(model)
