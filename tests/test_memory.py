"""Memory discipline: the frozen residual has no gradient or optimizer state, mixed dtypes and autocast
work, and a resample leaves no copy of a weight behind."""

import copy

import pytest
import torch
from torch import nn

import rosa
from rosa import model as rosa_model
from rosa.experiments.bench import AllocationTrace, allocation_trace, storage_bytes
from rosa.layers import RosaLayer


def mlp(width: int = 64, depth: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())], nn.Linear(width, 3))


def wrapped(width: int = 64, **config) -> nn.Sequential:
    config = {"rank": 4, "target_modules": r"[0246]", **config}
    return rosa.wrap(mlp(width), rosa.RosaConfig(**config))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).float().square().mean().backward()
    optimizer.step()


def test_residual_has_no_gradient_and_no_optimizer_state():
    model = wrapped()
    # even handed every parameter, AdamW keeps state only for parameters that get gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    for _ in range(2):
        step(model, optimizer, x)
        rosa.resample(model, optimizer)
    step(model, optimizer, x)
    layers = rosa.rosa_layers(model).values()
    residuals = [layer.base.weight for layer in layers]
    assert all(not w.requires_grad and w.grad is None for w in residuals)
    assert not any(w in optimizer.state for w in residuals)
    factors = rosa.model.factor_parameters(model)
    assert set(map(id, optimizer.state)) == set(map(id, factors))
    state_bytes = storage_bytes(v for s in optimizer.state.values() for v in s.values() if v.dim())
    assert state_bytes == 2 * storage_bytes(factors)  # Adam's two moments, nothing for W_res


def test_autocast_bf16_forward_and_backward_train_float32_factors():
    model = wrapped()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
    for p in rosa.model.factor_parameters(model):
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in rosa.model.factor_parameters(model))
    optimizer.step()
    rosa.resample(model, optimizer)
    expected = model(x)
    merged = rosa.merge(model)
    assert all(type(m) is nn.Linear for m in merged if not isinstance(m, nn.Tanh))
    assert torch.allclose(merged(x), expected, atol=1e-4)
    assert not torch.allclose(merged(x), reference(x), atol=1e-4)  # it trained


def test_bf16_model_with_float32_factors_under_autocast():
    model = mlp().to(torch.bfloat16)
    rosa.wrap(model, rosa.RosaConfig(rank=4, target_modules=r"[0246]", factor_dtype="float32"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(model, optimizer, x)
    layer = rosa.rosa_layers(model)["0"]
    assert layer.up.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    rosa.resample(model, optimizer)
    merged = rosa.merge(model)
    assert merged[0].weight.dtype == torch.bfloat16 and torch.isfinite(merged(x)).all()


def resample_trace(model: nn.Module) -> AllocationTrace:
    rosa.resample(model)  # a first resample, so one-off lazy allocations do not count
    return allocation_trace(lambda: rosa.resample(model))


def test_no_copy_of_a_weight_survives_a_resample():
    model = wrapped()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    before = storage_bytes(model.parameters())
    trace = resample_trace(model)
    assert trace.peak > 0  # the SVDs did allocate temporaries ...
    assert trace.net <= 0  # ... and every one was freed
    # parameters keep their storage: W_res and the factors are written in place
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages
    assert storage_bytes(model.parameters()) == before


def test_the_leak_check_detects_a_leaked_weight_copy(monkeypatch):
    leaked = []
    load_factors = RosaLayer.load_factors

    def leaky(self, up, down, residual):
        leaked.append(residual.clone())  # a hidden copy of W_res, kept alive
        load_factors(self, up, down, residual)

    monkeypatch.setattr(RosaLayer, "load_factors", leaky)
    model = wrapped()
    trace = resample_trace(model)
    assert trace.net >= 64 * 64 * 4  # at least one float32 weight left behind


def test_resample_peak_memory_follows_the_group_size(monkeypatch):
    model = wrapped(width=96)
    layer_bytes = 96 * 96 * 4
    whole = resample_trace(model).peak  # the four 96x96 layers in one batched SVD
    monkeypatch.setattr(rosa_model, "GROUP_BYTES", layer_bytes)  # one layer per SVD
    single = resample_trace(model).peak
    # measured 4.0x the chunk's float32 weights: the stack, U, Vh and LAPACK's working copy
    assert whole <= 5 * 4 * layer_bytes
    assert single <= 5 * layer_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resample_on_cuda_frees_its_temporaries():
    model = wrapped().cuda()
    rosa.resample(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rosa.resample(model)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
