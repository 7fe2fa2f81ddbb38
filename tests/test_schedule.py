import pytest
import torch
from torch import nn

import rosa


def wrapped():
    torch.manual_seed(0)
    return rosa.wrap(nn.Sequential(nn.Linear(8, 8)), rosa.RosaConfig(rank=2, target_modules=["0"]))


def test_every_steps_with_warmup_resamples_at_the_right_steps():
    model = wrapped()
    schedule = rosa.ResampleSchedule(every_steps=3, warmup=2)
    fired = [step for step in range(1, 12) if schedule.step(model, None)]
    assert fired == [5, 8, 11]
    assert schedule.resample_points == fired
    assert rosa.rosa_layers(model)["0"].resample_count == 3
    assert schedule.epoch_end(model, None) is False  # a step schedule ignores epochs


def test_every_epochs():
    model = wrapped()
    schedule = rosa.ResampleSchedule(every_epochs=2)
    assert [e for e in range(1, 7) if schedule.epoch_end(model, None)] == [2, 4, 6]
    assert schedule.step(model, None) is False


def test_schedule_clears_optimizer_state_of_factors():
    model = wrapped()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    schedule = rosa.ResampleSchedule(every_steps=1)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert all(p in opt.state for p in params)
    assert schedule.step(model, opt)
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "exactly one"),
        ({"every_steps": 2, "every_epochs": 1}, "exactly one"),
        ({"every_steps": 0}, "every_steps=0"),
        ({"every_epochs": 1.5}, "every_epochs=1.5"),
        ({"every_steps": 2, "warmup": -1}, "warmup=-1"),
    ],
)
def test_invalid_schedule(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        rosa.ResampleSchedule(**kwargs)


def test_state_dict_round_trip_and_mismatch():
    model = wrapped()
    schedule = rosa.ResampleSchedule(every_steps=2)
    for _ in range(5):
        schedule.step(model, None)
    restored = rosa.ResampleSchedule(every_steps=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.count == 5 and restored.resample_points == [2, 4]
    assert restored.step(model, None) is True  # step 6 is due, as it would have been
    with pytest.raises(ValueError, match="schedule state"):
        rosa.ResampleSchedule(every_steps=3).load_state_dict(schedule.state_dict())


def test_rewarmup_factor_ramps_after_the_latest_resample():
    # the latest resample came after step 10; n = 3: steps 11, 12, 13 run at 1/4, 2/4, 3/4 of the LR
    factors = [rosa.rewarmup_factor(done, [4, 10], 3) for done in range(15)]
    assert factors[:10] == [1.0] * 10
    assert factors[10:] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [rosa.rewarmup_factor(done, [4], 3) for done in range(3, 8)] == [1.0, 0.25, 0.5, 0.75, 1.0]
    assert rosa.rewarmup_factor(5, [], 3) == rosa.rewarmup_factor(5, [4], 0) == 1.0


def test_a_non_finite_factor_stops_the_schedule_with_the_error_and_changes_nothing():
    model = wrapped()
    schedule = rosa.ResampleSchedule(every_steps=1)
    layer = rosa.rosa_layers(model)["0"]
    with torch.no_grad():
        layer.down[1, 3] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rosa.NonFiniteError, match=r"rosa.resample refused: NaN or Inf in 0.down \(1 non-finite\)"):
        schedule.step(model, None)
    assert schedule.resample_points == [] and layer.resample_count == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_step_without_the_optimizer_is_refused_and_none_opts_out():
    model = wrapped()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    schedule = rosa.ResampleSchedule(every_steps=1)
    with pytest.raises(TypeError, match=r"step\(model, optimizer\) needs the optimizer.*optimizer=None"):
        schedule.step(model)
    with pytest.raises(TypeError, match=r"epoch_end\(model, optimizer\) needs the optimizer"):
        schedule.epoch_end(model)
    assert schedule.count == 0 and all(p in opt.state for p in params)  # nothing happened
    assert schedule.step(model, None)  # explicit opt-out: resamples, the optimizer is not touched
    assert all(p in opt.state for p in params)


def test_no_resample_after_the_last_step_of_a_known_total():
    model = wrapped()
    schedule = rosa.ResampleSchedule(every_steps=2, total=6)
    assert [step for step in range(1, 7) if schedule.step(model, None)] == [2, 4]
    assert rosa.rosa_layers(model)["0"].resample_count == 2
    with pytest.raises(ValueError, match="total=0"):
        rosa.ResampleSchedule(every_steps=2, total=0)
