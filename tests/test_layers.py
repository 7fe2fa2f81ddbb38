import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import rosa
from helpers import rel_err
from rosa.config import LayerSpec
from rosa.layers import RosaLinear


def make_base(kind: str, inp: int, out: int, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(inp, out, bias=bias)
    layer = Conv1D(out, inp)  # weight [in, out]; Conv1D always has a bias (zeros = "no bias")
    nn.init.normal_(layer.weight, std=0.2)
    if bias:
        nn.init.normal_(layer.bias, std=0.2)
    return layer


@given(
    kind=st.sampled_from(["linear", "conv1d"]),
    inp=st.integers(1, 40),
    out=st.integers(1, 40),
    bias=st.booleans(),
    selection=st.sampled_from(["random", "block", "top", "bottom"]),
    singular_values=st.sampled_from(["split", "down", "up"]),
    data=st.data(),
)
def test_wrap_and_resample_preserve_function(kind, inp, out, bias, selection, singular_values, data):
    rank = data.draw(st.integers(1, min(inp, out)))
    base = make_base(kind, inp, out, bias)
    x = torch.randn(5, 3, inp)
    expected = base(x).detach()
    layer = RosaLinear(base, rank, name="l", selection=selection, singular_values=singular_values)
    assert rel_err(layer(x).detach(), expected) <= 1e-5
    layer.resample()
    assert rel_err(layer(x).detach(), expected) <= 1e-5
    merged = layer.merge()
    assert type(merged) is type(base)
    assert rel_err(merged(x).detach(), expected) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_after_wrap_reproduces_weights_and_50_cycles_do_not_drift(kind):
    base = make_base(kind, 64, 48, bias=True)
    original = base.weight.detach().clone()
    layer = RosaLinear(base, 8, name="l")
    for _ in range(50):
        layer.resample()
    merged = layer.merge()
    assert rel_err(merged.weight, original) <= 1e-5


# Relative drift of the merged weight after 100 resamples of an untrained 64x64 layer (rank 8), by base
# dtype and residual dtype: measured over 8 seeds at most 1.05e-2 (bfloat16), 1.33e-3 (float16) and
# 1.8e-7 (float32, or any base with a float32 residual); RosaConfig.residual_dtype documents the figures.
DRIFT_BOUNDS = {
    (torch.float32, None): 1e-6,
    (torch.bfloat16, None): 1.3e-2,
    (torch.float16, None): 1.6e-3,
    (torch.bfloat16, torch.float32): 1e-6,
    (torch.float16, torch.float32): 1e-6,
}


@pytest.mark.parametrize("dtype, residual_dtype", list(DRIFT_BOUNDS))
def test_merged_weight_drift_over_100_resamples_is_bounded(dtype, residual_dtype):
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(dtype)
    original = base.weight.detach().clone()
    layer = RosaLinear(base, 8, name="l", residual_dtype=residual_dtype)
    for _ in range(100):
        layer.resample()
    assert layer.weight.dtype == (residual_dtype or dtype)
    merged = layer.merge()
    assert merged.weight.dtype == dtype
    assert rel_err(merged.weight, original) <= DRIFT_BOUNDS[dtype, residual_dtype]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_float32_residual_under_a_bf16_layer_computes_in_float32(kind):
    base = make_base(kind, 24, 16, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.double(), (base.weight.T if kind == "conv1d" else base.weight).double(),
                                          base.bias.double())
    layer = RosaLinear(base, 4, name="l", residual_dtype=torch.float32, factor_dtype=torch.float32)
    assert layer.base.weight.dtype == torch.float32 and layer.up.dtype == torch.float32
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 4e-3  # one bfloat16 rounding of the output
    assert rel_err(layer.merge()(x), expected) <= 8e-3


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_factor_gradients_match_float64_reference(kind):
    base = make_base(kind, 12, 9, bias=True)
    layer = RosaLinear(base, 3, name="l")
    with torch.no_grad():  # move away from the initial point so the reference is not trivial
        layer.up.add_(0.1 * torch.randn_like(layer.up))
        layer.down.add_(0.1 * torch.randn_like(layer.down))
    x = torch.randn(4, 12)
    target = torch.randn(4, 9)
    ((layer(x) - target) ** 2).sum().backward()

    # Independent float64 computation: y = x (W_res + U D)^T + b, loss = ||y - t||^2.
    w_res = layer.dense_weight().detach().double()
    up = layer.up.detach().double().requires_grad_()
    down = layer.down.detach().double().requires_grad_()
    y = x.double() @ (w_res + up @ down).T + base.bias.detach().double()
    ((y - target.double()) ** 2).sum().backward()
    assert torch.allclose(layer.up.grad.double(), up.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(layer.down.grad.double(), down.grad, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is None


def test_rank_larger_than_layer_is_clipped_with_warning():
    with pytest.warns(UserWarning, match="clipped to 4"):
        layer = RosaLinear(nn.Linear(4, 10), 9, name="small")
    assert layer.rank == 4 and layer.up.shape == (10, 4) and layer.down.shape == (4, 4)


def test_fractional_rank():
    layer = RosaLinear(nn.Linear(40, 20), 0.25, name="l")
    assert layer.rank == 5


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda l: l.weight.data.__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda l: l.weight.data.__setitem__((1, 1), float("inf")), "NaN or Inf"),
    ],
)
def test_non_finite_weight_rejected_before_anything_changes(corrupt, message):
    base = nn.Linear(6, 6)
    corrupt(base)
    snapshot = base.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        RosaLinear(base, 2, name="bad")
    assert torch.equal(base.weight.detach().nan_to_num(), snapshot.nan_to_num())
    assert base.weight.requires_grad


def test_integer_and_meta_weights_rejected():
    base = nn.Linear(4, 4)
    base.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="floating-point"):
        RosaLinear(base, 2, name="int")
    with pytest.raises(ValueError, match="meta"):
        RosaLinear(nn.Linear(4, 4, device="meta"), 2, name="meta")


def test_float32_factors_over_bf16_base_train_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = RosaLinear(base, 4, name="l", factor_dtype=torch.float32)
    assert layer.up.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(32, 16).to(torch.bfloat16)
    target = torch.randn(32, 8)
    opt = torch.optim.AdamW([layer.up, layer.down], lr=1e-2)
    losses = []
    for _ in range(20):
        out = layer(x)
        assert out.dtype == torch.bfloat16
        loss = ((out.float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = layer(x).float()
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    assert rel_err(merged(x).float().detach(), before) < 2e-2


def test_public_layer_export():
    assert rosa.RosaLinear is RosaLinear


def test_a_layer_built_from_a_spec_equals_one_built_from_keywords():
    spec = LayerSpec(rank=3, selection="block", seed=5, singular_values="up", factor_dtype=torch.float64)
    from_spec = RosaLinear(make_base("linear", 12, 10, True), spec, name="l")
    from_keywords = RosaLinear(make_base("linear", 12, 10, True), 3, name="l", selection="block", seed=5,
                               singular_values="up", factor_dtype=torch.float64)
    assert from_keywords.spec == spec
    for mine, theirs in zip(from_spec.state_dict().values(), from_keywords.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert from_spec.up.dtype == torch.float64
    assert "selection=block" in repr(from_spec) and "seed=5" in repr(from_spec)
    with pytest.raises(TypeError, match="seed"):
        RosaLinear(make_base("linear", 12, 10, True), spec, name="l", seed=1)
