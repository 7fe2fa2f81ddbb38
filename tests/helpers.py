"""Shared test helpers: where the real data lives, a benchmark module, relative error."""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with a copy of shared/ beside it; ROSA_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("ROSA_SHARED_DATA") or REPO.parent / "shared" / "data")
GLUE_DIR = SHARED_DATA / "glue"
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(),
                                reason=f"GLUE data not found under {GLUE_DIR} (set ROSA_SHARED_DATA)")


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks.<name>``."""
    return importlib.import_module(f"benchmarks.{name}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (``||b||`` floored at 1e-12), for tensors of any dtype and device."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW (lr 1e-2) over ``model``'s trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def mse(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(inputs), targets)


def train_resampling(model: torch.nn.Module, batch, rows: slice, steps: int, every: int,
                     after_resample=lambda model, optimizer: None, optimizer=None, start: int = 0,
                     loss_fn=mse) -> torch.Tensor:
    """``optimizer`` (default :func:`adamw`) on ``loss_fn(model, inputs, targets)`` (default the MSE) over
    ``rows`` of ``batch(step)``'s ``(inputs, targets)`` for steps ``start .. steps - 1``, ``rosa.resample``
    (then ``after_resample(model, optimizer)``) after every ``every``-th; the losses ``[steps - start]``."""
    import rosa

    optimizer = optimizer or adamw(model)
    losses = []
    for step in range(start, steps):
        x, y = batch(step)
        loss = loss_fn(model, x[rows], y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if (step + 1) % every == 0:
            rosa.resample(model, optimizer)
            after_resample(model, optimizer)
    return torch.stack(losses)


def _gloo_worker(rank: int, world: int, port: int, out: str, run) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run(rank)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def spawn_gloo(run, world: int, directory: Path) -> dict:
    """``run(rank)`` in ``world`` spawned processes of one gloo group on 127.0.0.1 (one thread each); rank 0's result."""
    import torch.multiprocessing as mp

    out = directory / "rank0.pt"
    mp.spawn(_gloo_worker, args=(world, free_port(), str(out), run), nprocs=world, join=True)
    return torch.load(out, weights_only=False)
