"""When to resample in a training loop, and the learning-rate re-warmup after a resample."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from .model import resample

_REQUIRED = object()  # the optimizer argument was left out


def rewarmup_factor(steps_done: int, resample_steps: Sequence[int], rewarmup_steps: int) -> float:
    """LR multiplier for the optimizer step after ``steps_done`` steps, given the step counts after
    which resamples happened (``ResampleSchedule.resample_points`` of a step schedule).

    The j-th step after the latest resample (j = 1..``rewarmup_steps``) runs at j / (n + 1) of the
    scheduled LR, as in ``RosaCallback``: the factors' optimizer state was just cleared, and Adam's
    first steps from empty moments move every entry by about the full LR. 1.0 otherwise.
    """
    if rewarmup_steps < 1 or not resample_steps:
        return 1.0
    j = steps_done - resample_steps[-1] + 1
    return j / (rewarmup_steps + 1) if 1 <= j <= rewarmup_steps else 1.0


class ResampleSchedule:
    """Calls ``rosa.resample`` at fixed intervals of a plain training loop.

    Give exactly one of ``every_steps`` (call :meth:`step` after each optimizer step) or
    ``every_epochs`` (call :meth:`epoch_end` after each epoch). The first ``warmup`` units
    (steps or epochs) pass before the interval starts counting. ``total``, the run's number of
    steps (or epochs) when known, skips a resample after the last one: its new subspace would
    never be trained. ``resample_points`` lists the step (or epoch) counts after which a resample
    happened.
    """

    def __init__(self, every_steps: Optional[int] = None, every_epochs: Optional[int] = None, warmup: int = 0,
                 total: Optional[int] = None):
        if (every_steps is None) == (every_epochs is None):
            raise ValueError(
                f"ResampleSchedule needs exactly one of every_steps or every_epochs, "
                f"got every_steps={every_steps!r}, every_epochs={every_epochs!r}"
            )
        every = every_steps if every_steps is not None else every_epochs
        label = "every_steps" if every_steps is not None else "every_epochs"
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ResampleSchedule.{label}={every!r} is invalid: use an int >= 1")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"ResampleSchedule.warmup={warmup!r} is invalid: use an int >= 0")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"ResampleSchedule.total={total!r} is invalid: use None or an int >= 1")
        self.every = every
        self.unit = "step" if every_steps is not None else "epoch"
        self.warmup = warmup
        self.total = total
        self.count = 0
        self.resample_points: list[int] = []

    def due(self, count: int, total: Optional[int] = None) -> bool:
        """Whether a resample is due after ``count`` completed units of a run of ``total`` (default:
        the schedule's ``total``); never after the last one."""
        total = self.total if total is None else total
        last = total is not None and count >= total
        return count > self.warmup and (count - self.warmup) % self.every == 0 and not last

    def _advance(self, unit: str, model: nn.Module, optimizer: Any) -> bool:
        if optimizer is _REQUIRED:
            raise TypeError(
                f"ResampleSchedule.{'step' if unit == 'step' else 'epoch_end'}(model, optimizer) needs the optimizer: "
                "each resample clears the factors' optimizer state, which would otherwise carry the old subspace's "
                "moments into the new one. Pass optimizer=None only if no optimizer holds the factors"
            )
        if unit != self.unit:
            return False
        self.count += 1
        if not self.due(self.count):
            return False
        resample(model, optimizer)
        self.resample_points.append(self.count)
        return True

    def step(self, model: nn.Module, optimizer: Any = _REQUIRED) -> bool:
        """Record one optimizer step; resample if due (clearing ``optimizer``'s state for the factors).
        Returns whether it resampled. ``optimizer`` is required; ``None`` says no optimizer holds the factors."""
        return self._advance("step", model, optimizer)

    def epoch_end(self, model: nn.Module, optimizer: Any = _REQUIRED) -> bool:
        """Record one finished epoch; resample if due. Returns whether it resampled. ``optimizer`` as in :meth:`step`."""
        return self._advance("epoch", model, optimizer)

    def state_dict(self) -> dict:
        """Progress of the schedule, for checkpoints."""
        return {"every": self.every, "unit": self.unit, "warmup": self.warmup, "count": self.count,
                "resample_points": list(self.resample_points)}

    def load_state_dict(self, state: dict) -> None:
        """Restore progress saved by :meth:`state_dict` (the intervals must match)."""
        mine = (self.every, self.unit, self.warmup)
        theirs = (state["every"], state["unit"], state["warmup"])
        if mine != theirs:
            raise ValueError(f"schedule state is for (every, unit, warmup)={theirs}, this schedule is {mine}")
        self.count = state["count"]
        self.resample_points = list(state["resample_points"])
