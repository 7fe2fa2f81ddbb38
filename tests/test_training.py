"""The optimizer step and LR schedule shared by ``rosa glue`` and ``rosa e2e``."""

import argparse
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rosa
from rosa.experiments.training import MAX_GRAD_NORM, add_rewarmup_option, adamw, optimizer_step, warmup_then_decay


class Regressor(nn.Module):
    """A model called like a Hugging Face one: keyword inputs, an output with ``.loss``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)

    def forward(self, x, y):
        return SimpleNamespace(loss=nn.functional.mse_loss(self.body(x), y))


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": 10 * torch.randn(4, 6, generator=g), "y": torch.randn(4, 6, generator=g)}


def test_optimizer_step_is_a_clipped_adamw_step_then_an_lr_step():
    torch.manual_seed(0)
    model = Regressor()
    reference = copy.deepcopy(model)
    optimizer = adamw(model, lr=0.1)
    scheduler = warmup_then_decay(optimizer, total_steps=10)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.0)
    ref_lrs = [0.1, 0.1, 0.1 * 8 / 9]  # 1 warmup step of 10 at (0 + 1) / 1, then (10 - step) / 9
    for step, lr in enumerate(ref_lrs):
        report = optimizer_step(model, batch(step), optimizer, scheduler, schedule=None)
        for group in ref_optimizer.param_groups:
            group["lr"] = lr
        loss = reference(**batch(step)).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_GRAD_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        assert norm > MAX_GRAD_NORM  # the batches are large enough that clipping matters
        assert report.loss == pytest.approx(loss.item())
        assert report.seconds > 0 and report.resample_seconds == 0.0
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 7 / 9)  # the scheduler stepped 3 times
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_step_resamples_on_schedule_unless_told_not_to():
    model = rosa.wrap(Regressor(), rosa.RosaConfig(rank=2, target_modules=["body"]))
    optimizer = adamw(model, lr=1e-2)
    schedule = rosa.ResampleSchedule(every_steps=1)
    scheduler = warmup_then_decay(optimizer, 10, schedule)
    report = optimizer_step(model, batch(0), optimizer, scheduler, schedule)
    assert schedule.resample_points == [1] and report.resample_seconds > 0
    optimizer_step(model, batch(1), optimizer, scheduler, schedule, resample=False)
    assert schedule.resample_points == [1]
    assert [p.requires_grad for p in model.parameters()].count(True) == len(optimizer.param_groups[0]["params"])


def test_adamw_holds_only_trainable_parameters_without_weight_decay():
    model = rosa.wrap(Regressor(), rosa.RosaConfig(rank=2, target_modules=["body"]))
    optimizer = adamw(model, lr=1e-3)
    held = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and held
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


def test_warmup_then_decay_rises_linearly_then_falls_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_then_decay(optimizer, total_steps=100)  # 6 warmup steps
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:7] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 94 / 94])
    assert lrs[50] == pytest.approx(50 / 94) and lrs[-1] == pytest.approx(1 / 94)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_lr_ramps_back_up_after_each_resample():
    model = rosa.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8)), rosa.RosaConfig(rank=2, target_modules=["0"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    schedule = rosa.ResampleSchedule(every_steps=5)
    scheduler = warmup_then_decay(optimizer, 20, schedule, rewarmup_steps=2)
    plain = warmup_then_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 20)
    ratios = []
    for _ in range(20):  # the order of optimizer_step: update, resample, LR step
        ratios.append(optimizer.param_groups[0]["lr"] / plain.optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step(model, optimizer)
        scheduler.step()
        plain.optimizer.step()
        plain.step()
    ramp = [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert ratios == pytest.approx([1.0] * 5 + ramp * 3)


def test_rewarmup_option_takes_a_step_count_and_refuses_negative_or_fractional_ones(capsys):
    parser = argparse.ArgumentParser(prog="rosa glue")
    add_rewarmup_option(parser)
    assert parser.parse_args([]).rewarmup_steps == 0
    assert parser.parse_args(["--rewarmup-steps", "20"]).rewarmup_steps == 20
    for bad, message in (("-1", "must be >= 0, got -1"), ("2.5", "expected a whole number of steps, got '2.5'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rewarmup-steps", bad])
        assert f"argument --rewarmup-steps: {message}" in capsys.readouterr().err
