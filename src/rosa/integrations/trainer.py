"""``RosaCallback``: ROSA resampling (and an optional LR re-warmup) inside ``transformers.Trainer``."""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..model import parameter_report, resample, rosa_layers, set_exact_saves
from ..optimizer_state import base_optimizer
from ..schedule import ResampleSchedule, rewarmup_factor

logger = logging.getLogger("rosa")


def _checkpointing(args: TrainingArguments) -> bool:
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))


def enable_input_grads(model: nn.Module) -> None:
    """Make a Hugging Face model's input embeddings output require grad, once (a no-op for other models)."""
    if hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


class RosaCallback(TrainerCallback):
    """Resample a ROSA-wrapped model on a schedule during ``Trainer.train()``.

    Give exactly one of ``every_steps`` (optimizer steps, i.e. ``state.global_step``) or
    ``every_epochs``; the first ``warmup`` steps (or epochs) pass before the interval starts
    counting. Each resample calls ``rosa.resample(model, optimizer)`` with the Trainer's optimizer
    (accelerate's wrapper included), which clears the factors' optimizer state. No resample runs
    after the last optimizer step (or epoch): its subspace would never be trained. An error of the
    resample (e.g. :class:`rosa.NonFiniteError` after a diverged step) stops training with it,
    the model unchanged and earlier checkpoints intact.

    While ``train()`` runs, the model's ``save_pretrained`` writes the exact ROSA state, so the
    Trainer's checkpoints resume exactly; before and after, it writes the merged plain model
    (``trainer.save_model()`` after training gives a model plain transformers loads).

    ``rewarmup_steps = n > 0`` ramps the learning rate back up after each resample: the j-th
    optimizer step after it (j = 1..n) runs at ``j / (n + 1)`` times the scheduled LR of every
    param group (:func:`rosa.rewarmup_factor`). The callback scales ``param_group["lr"]`` after the
    Trainer's scheduler step and restores the scheduled value right after the optimizer step, before
    the scheduler steps again, so any LR scheduler keeps seeing (and computing from) its own values.
    The ``learning_rate`` the Trainer logs is therefore the scheduled one, without the re-warmup factor.

    Log entries appended to ``state.log_history`` (kept in ``trainer_state.json``):
    ``{"rosa/trainable_params", "rosa/layers", "step"}`` at the start of training and
    ``{"rosa/resamples", "rosa/trainable_params", "step", "epoch"}`` after every resample.
    ``resample_steps`` lists the global steps at which resamples happened.

    With activation (gradient) checkpointing on, the callback makes the input embeddings' output
    require grad (``model.enable_input_require_grads()``, as PEFT does) unless the model already did:
    otherwise, under reentrant checkpointing, no gradient reaches the factors inside checkpointed blocks
    when the layers before them are frozen.
    """

    def __init__(
        self,
        every_steps: Optional[int] = None,
        every_epochs: Optional[int] = None,
        warmup: int = 0,
        rewarmup_steps: int = 0,
    ) -> None:
        self.schedule = ResampleSchedule(every_steps=every_steps, every_epochs=every_epochs, warmup=warmup)
        if isinstance(rewarmup_steps, bool) or not isinstance(rewarmup_steps, int) or rewarmup_steps < 0:
            raise ValueError(f"RosaCallback.rewarmup_steps={rewarmup_steps!r} is invalid: use an int >= 0")
        self.rewarmup_steps = rewarmup_steps
        self.resample_steps: list[int] = []
        self._scheduled_lrs: Optional[list[float]] = None  # group LRs before scaling, while scaled

    # -- Trainer events --------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs: Any
    ) -> None:
        layers = rosa_layers(model)
        if not layers:
            raise ValueError(
                "RosaCallback: the Trainer's model has no ROSA layers; call rosa.wrap(model, config) "
                "before creating the Trainer"
            )
        self._restore_progress(state)
        set_exact_saves(model, True)
        if _checkpointing(args):
            enable_input_grads(model)
        state.log_history.append(
            {"rosa/trainable_params": parameter_report(model)["trainable"], "rosa/layers": len(layers),
             "step": state.global_step}
        )

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: Any = None, **kwargs: Any) -> None:
        self._restore_lrs(optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.schedule.unit == "step" and self.schedule.due(state.global_step, state.max_steps):
            self._resample(state, model, optimizer)
        self._scale_lrs(state, optimizer)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.schedule.unit == "epoch" and self.schedule.due(round(state.epoch or 0), state.num_train_epochs):
            self._resample(state, model, optimizer)
            self._scale_lrs(state, optimizer)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._restore_lrs(optimizer)
        set_exact_saves(model, False)

    # -- helpers ---------------------------------------------------------------------------------
    def _restore_progress(self, state: TrainerState) -> None:
        """On ``resume_from_checkpoint``, recover the resample steps (and so a running re-warmup) from the
        log history; each layer's resample count comes back with the model's weights (its ``state_dict``)."""
        self.resample_steps = [e["step"] for e in state.log_history
                               if "rosa/resamples" in e and e["step"] <= state.global_step]

    def _resample(self, state: TrainerState, model: nn.Module, optimizer: Any) -> None:
        try:
            layers = resample(model, optimizer)
        except Exception:  # training stops here: saves after it write the merged model again
            set_exact_saves(model, False)
            raise
        self.resample_steps.append(state.global_step)
        state.log_history.append(
            {"rosa/resamples": len(self.resample_steps), "rosa/trainable_params": parameter_report(model)["trainable"],
             "step": state.global_step, "epoch": state.epoch}
        )
        logger.info("rosa: resampled %d layers at step %d", layers, state.global_step)

    def _scale_lrs(self, state: TrainerState, optimizer: Any) -> None:
        """Scale every group's LR for the next optimizer step while a re-warmup runs."""
        self._restore_lrs(optimizer)
        factor = rewarmup_factor(state.global_step, self.resample_steps, self.rewarmup_steps)
        if factor == 1.0:
            return
        groups = base_optimizer(optimizer).param_groups
        self._scheduled_lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * factor

    def _restore_lrs(self, optimizer: Any) -> None:
        """Put back the scheduled LRs saved by :meth:`_scale_lrs` (no-op when nothing is scaled)."""
        if self._scheduled_lrs is None:
            return
        for group, lr in zip(base_optimizer(optimizer).param_groups, self._scheduled_lrs):
            group["lr"] = lr
        self._scheduled_lrs = None
