"""Scale-out benchmark: ROSA with 1 and 2 processes (gloo, one thread each) on SmolLM2-135M, into
benchmarks/results/scale_out.{json,md}.

    python benchmarks/scale_out.py            # SmolLM2-135M-Instruct; run on a quiet machine
    python benchmarks/scale_out.py --tiny --out /tmp/scale_out   # a random 2-layer Llama, seconds (CI)

(a) one whole-model ``rosa.resample``, 1 process against 2 (each group's SVD on one rank, broadcast):
    the slower rank's wall time; goal ratio <= 0.6.
(b) per-rank bytes of parameters + gradients + optimizer state after a training step, FSDP2
    (``fully_shard`` per decoder layer, then the root) against DDP, 2 processes; goal ratio <= 0.55.
(c) ROSA against PEFT LoRA (same rank and target modules) training-step time under that FSDP2 setup,
    2 processes, their steps alternating; goal ratio <= 1.05.
(d) the SVDs of one resample group on a busy CPU (another process multiplying matrices on the same
    threads): one batched LAPACK call against rosa's separate per-matrix calls, 2 threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rosa
from rosa import subspace
from rosa.experiments.bench import load_model, make_batch, train_step
from rosa.experiments.methods import prepare_model
from rosa.experiments.reporting import format_table, machine_info, write_json, write_markdown

RESULTS = Path(__file__).parent / "results"
GOALS = {"resample_2_over_1": 0.6, "fsdp2_over_ddp_bytes": 0.55, "rosa_over_lora_step": 1.05}


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"
    rank: int = 8
    batch: int = 4  # per rank
    seq: int = 128
    steps: int = 6  # timed training steps per method (after one untimed step)
    resamples: int = 2  # timed resamples (after one untimed resample); the fastest counts
    svd_shape: tuple[int, int, int] = (24, 384, 384)  # (d): MiniLM's attention matrices


TINY = Settings(model="tiny-llama", rank=2, batch=2, seq=16, steps=3, resamples=1, svd_shape=(4, 64, 64))


# -- in each process ---------------------------------------------------------------------------
def rosa_model(s: Settings) -> nn.Module:
    return prepare_model(load_model(s.model, "lm", torch.float32, torch.device("cpu")), "rosa", s.rank)


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` on every decoder layer, then on the root (what accelerate's FSDP2 plugin does)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(model)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if rosa.sharded.is_sharded(tensor) else tensor


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards under FSDP2)."""
    params = list(model.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * t.element_size() for t in tensors)


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (collective)."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def resample_seconds(s: Settings) -> float:
    model = rosa_model(s)
    rosa.resample(model)  # untimed: lazy allocations
    times = []
    for _ in range(s.resamples):
        dist.barrier()
        start = time.perf_counter()
        rosa.resample(model)
        times.append(slowest(time.perf_counter() - start))
    return min(times)


def training_setup(s: Settings, method: str, wrapper: str) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    base = load_model(s.model, "lm", torch.float32, torch.device("cpu"))
    model = prepare_model(base, method, s.rank)
    model = shard(model) if wrapper == "fsdp2" else nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, make_batch(base, "lm", s.batch, s.seq, torch.device("cpu"))


def bytes_held(s: Settings, wrapper: str) -> int:
    model, optimizer, batch = training_setup(s, "rosa", wrapper)
    train_step(model, optimizer, batch)
    value = torch.tensor([held_bytes(model, optimizer)], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def step_seconds(s: Settings) -> dict[str, float]:
    """Median training-step time of ROSA and of LoRA under FSDP2, their steps alternating (A/B) so that
    the machine's drift hits both alike."""
    setups = {method: training_setup(s, method, "fsdp2") for method in ("rosa", "lora")}
    for model, optimizer, batch in setups.values():
        train_step(model, optimizer, batch)  # untimed
    times: dict[str, list[float]] = {method: [] for method in setups}
    for _ in range(s.steps):
        for method, (model, optimizer, batch) in setups.items():
            dist.barrier()
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            times[method].append(slowest(time.perf_counter() - start))
    return {method: statistics.median(t) for method, t in times.items()}


def two_process_measures(s: Settings) -> dict[str, Any]:
    """(a)'s 2-process resample, (b) and (c), one after another in the same 2 processes."""
    return {"resample": resample_seconds(s),
            "bytes": {wrapper: bytes_held(s, wrapper) for wrapper in ("ddp", "fsdp2")},
            "step": step_seconds(s)}


TASKS: dict[str, Callable[[Settings], Any]] = {"resample": resample_seconds, "two": two_process_measures}


def worker(rank: int, world: int, port: int, task: str, s: Settings, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = TASKS[task](s)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def launch(world: int, task: str, s: Settings) -> Any:
    """``TASKS[task](s)`` in ``world`` spawned processes of one gloo group; rank 0's result."""
    with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(world, port, task, s, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


# -- (d): SVDs on a busy CPU ---------------------------------------------------------------------
def busy(stop: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def busy_svd_seconds(shape: tuple[int, int, int], threads: int = 2) -> dict[str, float]:
    """Batched vs separate SVDs of ``shape`` at ``threads`` threads while another process keeps the same
    number of threads busy; the faster of two runs each."""
    weights = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    context = mp.get_context("spawn")
    stop = context.Event()
    competitor = context.Process(target=busy, args=(stop, threads))
    competitor.start()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        time.sleep(1.0)  # let the competitor start computing
        result = {}
        for name, svd in (("batched", lambda: torch.linalg.svd(weights, full_matrices=False)),
                          ("separate", lambda: subspace.separate_svds(weights))):
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                svd()
                runs.append(time.perf_counter() - start)
            result[name] = min(runs)
        return result
    finally:
        torch.set_num_threads(previous)
        stop.set()
        competitor.join()


# -- the run -------------------------------------------------------------------------------------
def run(s: Settings) -> dict[str, Any]:
    two = launch(2, "two", s)
    resample, held, step = {1: launch(1, "resample", s), 2: two["resample"]}, two["bytes"], two["step"]
    svd = busy_svd_seconds(s.svd_shape)
    ratios = {
        "resample_2_over_1": resample[2] / resample[1],
        "fsdp2_over_ddp_bytes": held["fsdp2"] / held["ddp"],
        "rosa_over_lora_step": step["rosa"] / step["lora"],
    }
    return {"settings": asdict(s), "resample_seconds": resample, "bytes_per_rank": held,
            "fsdp2_step_seconds": step, "busy_svd_seconds": svd, "ratios": ratios,
            "goals_met": {k: ratios[k] <= goal for k, goal in GOALS.items()}, "machine": machine_info()}


def markdown(result: dict[str, Any]) -> str:
    s, r = result["settings"], result["ratios"]
    rows = [
        {"measure": "(a) one resample, 2 processes / 1", "ratio": r["resample_2_over_1"],
         "values": f"{result['resample_seconds'][2]:.2f} s / {result['resample_seconds'][1]:.2f} s"},
        {"measure": "(b) per-rank param+grad+optimizer bytes, FSDP2 / DDP", "ratio": r["fsdp2_over_ddp_bytes"],
         "values": f"{result['bytes_per_rank']['fsdp2'] / 2**20:.1f} MiB / {result['bytes_per_rank']['ddp'] / 2**20:.1f} MiB"},
        {"measure": "(c) training step under FSDP2, ROSA / LoRA", "ratio": r["rosa_over_lora_step"],
         "values": f"{result['fsdp2_step_seconds']['rosa']:.3f} s / {result['fsdp2_step_seconds']['lora']:.3f} s"},
    ]
    for row, (key, goal) in zip(rows, GOALS.items()):
        row["goal"] = f"<= {goal}"
        row["met"] = "yes" if result["goals_met"][key] else "no"
    svd = result["busy_svd_seconds"]
    return (
        f"Model {s['model']}, ROSA rank {s['rank']} (LoRA the same rank and targets), batch {s['batch']} per rank, "
        f"sequence {s['seq']}; gloo on one machine, one thread per process; times are the slowest rank's.\n\n"
        + format_table(rows, ["measure", "values", "ratio", "goal", "met"], floatfmt=".3f")
        + f"\n\n(d) SVDs of {s['svd_shape'][0]} matrices {s['svd_shape'][1]}x{s['svd_shape'][2]} at 2 threads beside "
        f"another process busy on 2 threads: one batched call {svd['batched']:.2f} s, separate calls (what rosa "
        f"runs on the CPU) {svd['separate']:.2f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama and small shapes: seconds")
    parser.add_argument("--out", default=str(RESULTS), help="folder for scale_out.json and scale_out.md")
    args = parser.parse_args()
    result = run(TINY if args.tiny else Settings())
    out = Path(args.out)
    write_json(out / "scale_out.json", result)
    write_markdown(out / "scale_out.md", "Scale-out: resample split across ranks, FSDP2 memory and step time",
                   markdown(result), result["machine"])
    print(markdown(result))


if __name__ == "__main__":
    main()
