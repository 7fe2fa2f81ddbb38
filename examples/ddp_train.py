"""ROSA under DistributedDataParallel: launch with torchrun or accelerate launch.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py
    accelerate launch --cpu --num_processes 2 examples/ddp_train.py

Every rank wraps the same model with the same ``RosaConfig.seed``, so each resample draws the same
subspaces everywhere with no communication; ``check_rank_agreement`` verifies it after each one.
Each rank trains on its slice of one global batch, so the run matches one process on the whole batch.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rosa
from rosa.distributed import check_rank_agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resample-every", type=int, default=3)
    parser.add_argument("--out", help="rank 0 writes the losses and resample steps here (JSON)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    rosa.wrap(model, rosa.RosaConfig(rank=4, seed=0))  # wrap first, then DDP
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    schedule = rosa.ResampleSchedule(every_steps=args.resample_every)

    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        x, y = torch.randn(8, 16, generator=data), torch.randn(8, 4, generator=data)  # the global batch
        loss = nn.functional.mse_loss(ddp(x.chunk(world)[rank]), y.chunk(world)[rank])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule.step(model, optimizer):
            check_rank_agreement(model)  # raises, naming the layer, if ranks drew different subspaces
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    if rank == 0 and args.out:
        with open(args.out, "w") as handle:
            json.dump({"world_size": world, "losses": losses, "resample_steps": schedule.resample_points}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
