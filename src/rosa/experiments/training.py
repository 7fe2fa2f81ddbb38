"""The optimizer, LR schedule and optimizer step shared by the ``rosa glue`` and ``rosa e2e`` loops.

Every method gets the same recipe: AdamW without weight decay (decay on ROSA's factors would pull
the merged weight towards the residual, not towards the pretrained weight), a linear warmup then
linear decay to 0, gradient clipping, and for ROSA a resample after the step when its schedule says
so, optionally followed by a short LR re-warmup (:func:`rosa.rewarmup_factor`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

import rosa

from .reporting import default_device

WARMUP_FRACTION = 0.06  # of all optimizer steps: linear warmup, then linear decay to 0
MAX_GRAD_NORM = 1.0


def adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, without weight decay."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def warmup_then_decay(optimizer: torch.optim.Optimizer, total_steps: int,
                      schedule: Optional[rosa.ResampleSchedule] = None,
                      rewarmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``WARMUP_FRACTION`` of the steps, then linear decay to 0; with a step
    ``schedule``, also a linear re-warmup over ``rewarmup_steps`` after each of its resamples."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        restart = rosa.rewarmup_factor(step, schedule.resample_points, rewarmup_steps) if schedule else 1.0
        if step < warmup:
            return restart * (step + 1) / warmup
        return restart * max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepReport:
    """One optimizer step: its loss, its time (forward to update) and the time of the resample after it."""

    loss: float
    seconds: float
    resample_seconds: float


def optimizer_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, schedule: Optional[rosa.ResampleSchedule],
                   resample: bool = True) -> StepReport:
    """Train ``model`` on one batch (moved to the default device): forward, backward, clip, step.

    Then ``schedule.step`` (a ROSA resample when due), unless ``resample`` is False (after the last
    step a resample is wasted), and last the LR scheduler, so the next step's LR sees the resample.
    """
    tick = time.perf_counter()
    loss = model(**{k: v.to(default_device()) for k, v in batch.items()}).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - tick
    resample_seconds = 0.0
    if schedule is not None and resample:
        tick = time.perf_counter()
        schedule.step(model, optimizer)
        resample_seconds = time.perf_counter() - tick
    scheduler.step()
    return StepReport(loss.item(), seconds, resample_seconds)


def add_methods_option(parser: argparse.ArgumentParser, methods: Sequence[str], default: Sequence[str]) -> None:
    """The ``--methods M [M ...]`` command-line option: which of ``methods`` to compare."""
    parser.add_argument("--methods", nargs="+", choices=methods, default=list(default),
                        help=f"methods to compare (default: {' '.join(default)})")


def add_rewarmup_option(parser: argparse.ArgumentParser) -> None:
    """The ``--rewarmup-steps N`` command-line option (default 0: no re-warmup)."""
    parser.add_argument("--rewarmup-steps", type=_steps, default=0,
                        help="after each ROSA resample, ramp the LR back up linearly over this many steps "
                             "(the factors' optimizer state was cleared; default: %(default)s)")


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
