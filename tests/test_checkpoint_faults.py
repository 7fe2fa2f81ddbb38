"""Checkpoints under faults: seeded corruption of every file, and savers running at the same time."""

from __future__ import annotations

import copy
import errno
import multiprocessing
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import rosa
from rosa import checkpoint
from rosa.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

FILES = (checkpoint.MANIFEST, *checkpoint.DATA_FILES)
FUZZ_SEED = 2707
FUZZ_TRIALS = 300
ROUNDS = 10  # saves per concurrent saver


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return rosa.wrap(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), rosa.RosaConfig(rank=2, seed=3))


def tiny_run(seed: int) -> tuple:
    """A tiny model with ROSA layers, AdamW, an LR scheduler and a schedule, trained 3 steps (one resample)."""
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    schedule = rosa.ResampleSchedule(every_steps=2)
    for step in range(3):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        schedule.step(model, optimizer)
    return model, optimizer, scheduler, schedule


def snapshot(model, optimizer, scheduler, schedule) -> dict:
    """Everything a load may change, copied."""
    return copy.deepcopy({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "schedule": schedule.state_dict(),
        "resample_counts": [layer.resample_count for layer in rosa.rosa_layers(model).values()],
        "torch_rng": torch.get_rng_state(),
    })


def assert_bitwise_equal(a, b, path: str = "state") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(as_bytes(a), as_bytes(b)), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# -- corruption fuzz ------------------------------------------------------------------------------
def mutations(pristine: dict[str, bytes]):
    """Seeded (file, kind, argument) damage: every file deleted and emptied, then random bit flips and truncations."""
    for name in FILES:
        yield name, "delete", None
        yield name, "truncate", 0
    rng = random.Random(FUZZ_SEED)
    for _ in range(FUZZ_TRIALS):
        name = rng.choice(FILES)
        size = len(pristine[name])
        if rng.random() < 0.8:
            yield name, "flip", (rng.randrange(size), rng.randrange(8))
        else:
            yield name, "truncate", rng.randrange(size)


def damage(directory: Path, pristine: dict[str, bytes], name: str, kind: str, argument) -> None:
    if kind == "delete":
        (directory / name).unlink()
    elif kind == "truncate":
        (directory / name).write_bytes(pristine[name][:argument])
    else:
        position, bit = argument
        data = bytearray(pristine[name])
        data[position] ^= 1 << bit
        (directory / name).write_bytes(bytes(data))


def test_every_corruption_is_refused_with_nothing_changed_or_loads_the_saved_state(tmp_path):
    """Each damaged load raises CheckpointError and changes nothing, or restores the saved state bit for bit."""
    saved_run = tiny_run(0)
    extra = {"step": 3, "tag": "fuzz", "ema": torch.arange(3.0)}
    saved = snapshot(*saved_run)
    save_checkpoint(tmp_path / "ckpt", *saved_run, extra=extra)
    pristine = {name: (tmp_path / "ckpt" / name).read_bytes() for name in FILES}

    target = tiny_run(1)
    torch.manual_seed(99)
    before = snapshot(*target)
    outcomes = {"refused": 0, "identical": 0}
    for name, kind, argument in mutations(pristine):
        damage(tmp_path / "ckpt", pristine, name, kind, argument)
        case = f"{kind} {argument} in {name}"
        try:
            loaded_extra = load_checkpoint(tmp_path / "ckpt", *target)
        except CheckpointError:
            outcomes["refused"] += 1
            assert_bitwise_equal(snapshot(*target), before, f"after a refused load ({case})")
        else:
            outcomes["identical"] += 1
            assert_bitwise_equal(snapshot(*target), saved, f"after a load ({case})")
            assert_bitwise_equal(loaded_extra, extra, f"extra ({case})")
            target = tiny_run(1)
            torch.manual_seed(99)
        try:
            assert_bitwise_equal(checkpoint.checkpoint_extra(tmp_path / "ckpt"), extra, f"checkpoint_extra ({case})")
        except CheckpointError:
            pass
        (tmp_path / "ckpt" / name).write_bytes(pristine[name])
    assert sum(outcomes.values()) == FUZZ_TRIALS + 2 * len(FILES)
    assert outcomes["refused"] > FUZZ_TRIALS // 2, outcomes


# -- savers at the same time ----------------------------------------------------------------------
def advance(model: nn.Module) -> None:
    """The change a saver makes before each save."""
    with torch.no_grad():
        rosa.rosa_layers(model)["0"].up.add_(1)


def save_rounds(folder: str, name: str, seed: int, barrier) -> None:
    """Save ``ROUNDS`` checkpoints to ``folder/name``, the model advanced before each (run in a child process)."""
    torch.set_num_threads(1)
    model = tiny_model(seed)
    barrier.wait(timeout=120)
    for round_ in range(ROUNDS):
        advance(model)
        save_checkpoint(Path(folder) / name, model, extra={"round": round_, "seed": seed})


def test_processes_saving_in_one_folder_at_once_all_succeed_and_every_checkpoint_loads(tmp_path):
    """Two savers of ``ck`` (serialized by its lock) and one of ``ck.best`` (whose temporaries ``ck``'s must spare)."""
    names = ("ck", "ck", "ck.best")
    context = multiprocessing.get_context("fork")  # the children need no fresh imports
    barrier = context.Barrier(len(names))
    savers = [context.Process(target=save_rounds, args=(str(tmp_path), name, seed, barrier))
              for seed, name in enumerate(names)]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join(timeout=300)
    assert [saver.exitcode for saver in savers] == [0] * len(names)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.best"]  # no temporaries, asides or locks left
    for name in ("ck", "ck.best"):
        model = tiny_model(7)
        extra = load_checkpoint(tmp_path / name, model)
        assert extra["round"] == ROUNDS - 1 and names[extra["seed"]] == name
        expected = tiny_model(extra["seed"])
        for _ in range(ROUNDS):
            advance(expected)
        assert_bitwise_equal(model.state_dict(), expected.state_dict())


def test_a_save_removes_only_its_own_stale_temporaries(tmp_path):
    token = "0123456789abcdef"
    own_stale = tmp_path / f".ck{checkpoint.TEMP_MARKER}{token}"
    others = [
        tmp_path / f".ck.best{checkpoint.TEMP_MARKER}{token}",  # another checkpoint's save in progress
        tmp_path / f".ck{checkpoint.TEMP_MARKER}notes",  # not a name a save makes
        tmp_path / ".ck.abc123.tmp",
    ]
    for path in [own_stale, *others]:
        path.mkdir()
        (path / checkpoint.MODEL_FILE).write_bytes(b"\x00" * 10)
    save_checkpoint(tmp_path / "ck", tiny_model(0))
    assert not own_stale.exists()
    assert all((path / checkpoint.MODEL_FILE).exists() for path in others)


def test_a_save_waits_while_another_holds_the_checkpoint_lock(tmp_path):
    directory = tmp_path / "ck"
    saver = threading.Thread(target=save_checkpoint, args=(directory, tiny_model(0)))
    with checkpoint._locked(directory):
        saver.start()
        time.sleep(0.5)
        assert saver.is_alive() and not directory.exists()
    saver.join(timeout=60)
    assert not saver.is_alive() and checkpoint.is_checkpoint(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_where_the_file_system_cannot_lock_a_save_warns_and_proceeds(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="cannot lock .*saving unlocked"):
        save_checkpoint(tmp_path / "ck", tiny_model(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    load_checkpoint(tmp_path / "ck", tiny_model(1))
