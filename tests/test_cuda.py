"""ROSA on a CUDA device, checked against the same work on the CPU and against float64 references.

Every test here needs a GPU and is skipped without one (CI has none); run them on a GPU machine with
``CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m pytest tests/test_cuda.py``.
"""

import copy
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import pytest
import torch
from torch import nn

import rosa
from rosa import subspace
from rosa.checkpoint import load_checkpoint, save_checkpoint
from helpers import rel_err
from rosa.layers import RosaLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")
CUDA = torch.device("cuda")


def tiny_model(arch: str) -> nn.Module:
    """A randomly initialised causal LM: GPT-2 (``Conv1D`` layers) or Llama (``nn.Linear``)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def token_batch(batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_wrap_resample_and_merge_on_cuda_preserve_function_and_match_cpu(arch):
    cpu = tiny_model(arch).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = token_batch()
    with torch.no_grad():
        expected = cpu(input_ids=ids).logits
        config = rosa.RosaConfig(rank=4, seed=3)
        rosa.wrap(cpu, config)
        rosa.wrap(gpu, config)
        assert rel_err(gpu(input_ids=ids.to(CUDA)).logits, expected) <= 1e-5
        for _ in range(2):
            rosa.resample(cpu)
            rosa.resample(gpu)
        assert rel_err(gpu(input_ids=ids.to(CUDA)).logits, expected) <= 1e-5
        # Same index sets on both devices (they depend on seed, name and count only). Singular vectors
        # may differ in sign between LAPACK and cuSOLVER, so compare the update up @ down, not the factors.
        gpu_layers = rosa.rosa_layers(gpu)
        for name, layer in rosa.rosa_layers(cpu).items():
            other = gpu_layers[name]
            assert other.up.device.type == "cuda" and other.base.weight.device.type == "cuda"
            assert rel_err(other.up.cpu() @ other.down.cpu(), layer.up @ layer.down) <= 1e-4
        merged = rosa.merge(gpu)
        assert not rosa.rosa_layers(merged)
        assert rel_err(merged(input_ids=ids.to(CUDA)).logits, expected) <= 1e-5


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_factor_gradients_on_cuda_match_a_float64_cpu_reference(base_dtype):
    torch.manual_seed(0)
    layer = RosaLinear(nn.Linear(48, 40).to(CUDA, base_dtype), 6, name="l", factor_dtype=torch.float32)
    with torch.no_grad():  # move away from the initial point so the reference is not trivial
        layer.up.add_(0.1 * torch.randn_like(layer.up))
        layer.down.add_(0.1 * torch.randn_like(layer.down))
    x = torch.randn(7, 48, device=CUDA, dtype=base_dtype)
    target = torch.randn(7, 40, device=CUDA)
    ((layer(x).float() - target) ** 2).sum().backward()

    # float64 on the CPU: y = x W_res^T + b + x (U D)^T, loss = ||y - t||^2
    w_res = layer.dense_weight().detach().double().cpu()
    bias = layer.base.bias.detach().double().cpu()
    up = layer.up.detach().double().cpu().requires_grad_()
    down = layer.down.detach().double().cpu().requires_grad_()
    x64 = x.double().cpu()
    y = x64 @ w_res.T + bias + x64 @ (up @ down).T
    ((y - target.double().cpu()) ** 2).sum().backward()
    tolerance = 1e-5 if base_dtype == torch.float32 else 2e-2  # bf16 rounds the base output (8-bit mantissa)
    assert layer.up.grad.dtype == layer.down.grad.dtype == torch.float32
    assert rel_err(layer.up.grad, up.grad) <= tolerance
    assert rel_err(layer.down.grad, down.grad) <= tolerance
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("spectrum", ["1/i^3", "rank 3", "zero"])
def test_thin_svd_on_cuda_is_accurate_on_ill_conditioned_and_rank_deficient_weights(spectrum):
    k = 96
    i = torch.arange(1, k + 1, dtype=torch.float64)
    s_true = {"1/i^3": i ** -3.0, "rank 3": torch.where(i <= 3, 1 / i, 0.0), "zero": torch.zeros(k, dtype=torch.float64)}
    q1 = torch.linalg.qr(torch.randn(4, 128, k, dtype=torch.float64)).Q  # [4, 128, k]
    q2 = torch.linalg.qr(torch.randn(4, k, k, dtype=torch.float64)).Q  # [4, k, k]
    w = ((q1 * s_true[spectrum]) @ q2.mT).float()  # [4, 128, k]
    u, s, vh = subspace.thin_svd(w.to(CUDA))
    assert u.shape == (4, 128, k) and s.shape == (4, k) and vh.shape == (4, k, k)
    error = subspace.svd_error(w.double(), u.double().cpu(), s.double().cpu(), vh.double().cpu())
    assert (error <= subspace.SVD_TOLERANCE).all()
    assert (s.double().cpu() - torch.linalg.svdvals(w.double())).abs().max() <= 1e-5 * max(s_true[spectrum][0], 1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def train(model: nn.Module, steps: int, device: torch.device, start: int = 0, optimizer=None, schedule=None):
    """AdamW steps with a resample every 3 steps; returns the losses and the training state."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = schedule or rosa.ResampleSchedule(every_steps=3)
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g).to(device), torch.randn(8, 4, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step(model, optimizer)
        losses.append(loss.item())
    return losses, optimizer, schedule


def wrapped_mlp(device: torch.device) -> nn.Module:
    return rosa.wrap(mlp().to(device), rosa.RosaConfig(rank=3, target_modules=["0", "2"], modules_to_save=["4"]))


def test_training_with_resamples_on_cuda_tracks_the_cpu_run():
    # AdamW is sign-equivariant per coordinate, so the runs agree even where the SVDs pick other signs.
    cpu_model, gpu_model = wrapped_mlp(torch.device("cpu")), wrapped_mlp(CUDA)
    cpu_losses, *_ = train(cpu_model, 10, torch.device("cpu"))
    gpu_losses, *_ = train(gpu_model, 10, CUDA)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    cpu_merged, gpu_merged = rosa.merge(cpu_model), rosa.merge(gpu_model)
    untrained = mlp().state_dict()
    for name, weight in cpu_merged.state_dict().items():
        assert rel_err(gpu_merged.state_dict()[name], weight) <= 1e-4, name
        if name.endswith("weight"):  # adapted weights and the saved head trained (biases of adapted layers stay)
            assert rel_err(weight, untrained[name]) > 1e-3, name


def test_checkpoint_resume_on_cuda_is_bitwise_identical(tmp_path):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        straight = wrapped_mlp(CUDA)
        expected, *_ = train(straight, 8, CUDA)
        first = wrapped_mlp(CUDA)
        head, optimizer, schedule = train(first, 4, CUDA)  # a resample happened after step 3
        save_checkpoint(tmp_path / "ckpt", first, optimizer, schedule=schedule, extra={"step": 4})
        resumed = wrapped_mlp(CUDA)
        optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
        schedule = rosa.ResampleSchedule(every_steps=3)
        assert load_checkpoint(tmp_path / "ckpt", resumed, optimizer, schedule=schedule) == {"step": 4}
        assert all(p.device.type == "cuda" for p in resumed.parameters())
        tail, *_ = train(resumed, 4, CUDA, start=4, optimizer=optimizer, schedule=schedule)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert head + tail == expected
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_autocast_bf16_on_cuda_trains_float32_factors():
    model = wrapped_mlp(CUDA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 16, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
    factors = rosa.model.factor_parameters(model)
    assert all(p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in factors)
    optimizer.step()
    rosa.resample(model, optimizer)
    expected = model(x)
    merged = rosa.merge(model)
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_trainer_and_callback_resample_a_model_on_cuda(tmp_path):
    from rosa.integrations import RosaCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = rosa.wrap(transformers.BertForSequenceClassification(config),
                      rosa.RosaConfig(rank=2, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (16, 8), generator=g)
    labels = torch.randint(0, 2, (16,), generator=g)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          disable_tqdm=True, seed=0)
    callback = RosaCallback(every_steps=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    assert callback.resample_steps == [3, 6]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    batch = {"input_ids": ids[:4].to(CUDA), "attention_mask": torch.ones(4, 8, dtype=torch.long, device=CUDA)}
    with torch.no_grad():
        expected = model(**batch).logits
        assert rel_err(rosa.merge(model)(**batch).logits, expected) <= 1e-5
