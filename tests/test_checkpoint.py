"""Checkpoints: bitwise resume across resamples, atomic replacement, and clear errors on bad checkpoints."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import rosa
from rosa import checkpoint
from rosa.checkpoint import CheckpointError, checkpoint_metadata, load_checkpoint, save_checkpoint
from rosa.errors import NonFiniteError
from safetensors.torch import load_file

STEPS = 7
RESAMPLE_EVERY = 3


@pytest.fixture(autouse=True)
def deterministic():
    """Deterministic kernels, on one thread (small SVDs are much faster so on a shared, busy CPU)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.set_num_threads(previous[1])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)  # wte and lm_head are tied


def mlp_loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return nn.functional.mse_loss(model(x), y)


def gpt2_loss(model: nn.Module, step: int) -> torch.Tensor:
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(step))
    return model(input_ids=ids, labels=ids).loss


class ConvEmbed(nn.Module):
    """Token embedding (with a padding row) -> Conv2d over a [dim x length] image -> linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 6, 3)

    def forward(self, ids):
        image = self.embed(ids).unsqueeze(1)  # [B, 1, 6, 8]
        return self.head(torch.relu(self.conv(image)).flatten(1))


def conv_embed_loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    ids, y = torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g)
    return nn.functional.cross_entropy(model(ids), y)


# kind -> (model factory, loss, target_modules)
MODELS = {
    "mlp": (mlp, mlp_loss, ["0", "2"]),
    "gpt2": (tiny_gpt2, gpt2_loss, None),
    "conv_embed": (ConvEmbed, conv_embed_loss, ["embed", "conv", "head"]),
}


@dataclass
class Run:
    """One training run: a wrapped model with dropout, AdamW, an LR scheduler and a resample schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: rosa.ResampleSchedule
    loss_fn: object

    @classmethod
    def build(cls, kind: str, init_seed: int = 0, rank: int = 2, singular_values: str = "split") -> "Run":
        make, loss_fn, targets = MODELS[kind]
        torch.manual_seed(init_seed)
        config = rosa.RosaConfig(rank=rank, dropout=0.1, seed=5, target_modules=targets, singular_values=singular_values)
        model = rosa.wrap(make(), config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return cls(model, optimizer, scheduler, rosa.ResampleSchedule(every_steps=RESAMPLE_EVERY), loss_fn)

    def train(self, start: int, stop: int) -> list[torch.Tensor]:
        losses = []
        for step in range(start, stop):
            loss = self.loss_fn(self.model, step)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.schedule.step(self.model, self.optimizer)
            losses.append(loss.detach())
        return losses

    def save(self, directory, step: int) -> None:
        save_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.schedule, extra={"step": step})

    def load(self, directory) -> dict:
        return load_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.schedule)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("save_at", [2, RESAMPLE_EVERY])  # just before / just after the first resample
def test_resume_is_bitwise_identical_across_a_resample(tmp_path, kind, save_at):
    reference = Run.build(kind)
    expected_losses = reference.train(0, STEPS)

    first = Run.build(kind)
    first.train(0, save_at)
    first.save(tmp_path / "ckpt", save_at)
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state at load time

    resumed = Run.build(kind, init_seed=99)  # different initial weights: the checkpoint restores them
    extra = resumed.load(tmp_path / "ckpt")
    losses = resumed.train(extra["step"], STEPS)

    assert extra == {"step": save_at}
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses[save_at:]))
    assert_same_state(state(resumed.model), state(reference.model))
    assert resumed.schedule.resample_points == reference.schedule.resample_points == [3, 6]
    counts = [layer.resample_count for layer in rosa.rosa_layers(resumed.model).values()]
    assert counts == [2] * len(counts)


def test_tied_weights_are_stored_once_and_restored_to_both_names(tmp_path):
    run = Run.build("gpt2")
    run.save(tmp_path / "ckpt", 0)
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / checkpoint.MODEL_FILE, "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    resumed = Run.build("gpt2", init_seed=7)
    resumed.load(tmp_path / "ckpt")
    assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight
    assert_same_state(state(resumed.model), state(run.model))


def test_metadata_describes_the_saved_model(tmp_path):
    run = Run.build("mlp")
    run.train(0, RESAMPLE_EVERY)
    run.save(tmp_path / "ckpt", RESAMPLE_EVERY)
    meta = checkpoint_metadata(tmp_path / "ckpt")
    assert meta["config"] == run.model.rosa_config
    assert [(m["name"], m["rank"]) for m in meta["layers"]] == [("0", 2), ("2", 2)]
    assert meta["model_class"] == "torch.nn.modules.container.Sequential"


# -- atomic replacement -----------------------------------------------------------------------------
@pytest.fixture
def saved_once(tmp_path):
    """A checkpoint of step 1 at tmp_path/ckpt, plus the run that wrote it (trained further)."""
    run = Run.build("mlp")
    run.train(0, 1)
    run.save(tmp_path / "ckpt", 1)
    snapshot = state(run.model)
    run.train(1, 2)
    return run, tmp_path / "ckpt", snapshot


def assert_loads_step_1(directory, snapshot) -> None:
    fresh = Run.build("mlp", init_seed=3)
    assert fresh.load(directory) == {"step": 1}
    assert_same_state(state(fresh.model), snapshot)


def test_exception_mid_save_keeps_the_previous_checkpoint(saved_once, monkeypatch):
    run, directory, snapshot = saved_once
    calls = []

    def failing_save_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return torch_save_file(tensors, path)

    torch_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        run.save(directory, 2)
    assert_loads_step_1(directory, snapshot)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]


def test_crash_after_moving_the_old_checkpoint_aside_is_recovered(saved_once, monkeypatch):
    run, directory, snapshot = saved_once
    real_rename = os.rename

    def rename(src, dst):
        if checkpoint.TEMP_MARKER in str(src):  # moving the new checkpoint into place
            raise KeyboardInterrupt("killed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run.save(directory, 2)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert not directory.exists()  # only the aside copy survived the "crash"
    assert_loads_step_1(directory, snapshot)


def test_stale_temp_dir_from_a_killed_save_is_ignored_then_cleaned(saved_once):
    run, directory, snapshot = saved_once
    stale = directory.parent / f".ckpt{checkpoint.TEMP_MARKER}0123456789abcdef"
    stale.mkdir()
    (stale / checkpoint.MODEL_FILE).write_bytes(b"\x00" * 10)  # half-written
    assert_loads_step_1(directory, snapshot)
    run.save(directory, 2)
    assert not stale.exists()
    assert Run.build("mlp").load(directory) == {"step": 2}


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a ROSA checkpoint"):
        save_checkpoint(tmp_path, Run.build("mlp").model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("user_entry", ["notes.txt", "eval/"])
def test_refuses_to_replace_a_checkpoint_holding_a_users_file(saved_once, user_entry):
    run, directory, snapshot = saved_once
    if user_entry.endswith("/"):
        (directory / user_entry).mkdir()
    else:
        (directory / user_entry).write_text("precious")
    before = sorted(p.name for p in directory.parent.iterdir()), sorted(p.name for p in directory.iterdir())
    with pytest.raises(CheckpointError, match=f"also holds '{user_entry}', which saving would delete"):
        run.save(directory, 2)
    assert (sorted(p.name for p in directory.parent.iterdir()), sorted(p.name for p in directory.iterdir())) == before
    assert_loads_step_1(directory, snapshot)


# -- a poisoned state never replaces the last good checkpoint --------------------------------------
@pytest.mark.parametrize("where", ["model", "optimizer", "extra"])
def test_non_finite_state_is_refused_and_the_checkpoint_kept(saved_once, where):
    run, directory, snapshot = saved_once
    extra = {"step": 2, "ema": torch.zeros(3)}
    with torch.no_grad():
        if where == "model":
            rosa.rosa_layers(run.model)["0"].up[1, 0] = float("nan")
        elif where == "optimizer":
            run.optimizer.state_dict()["state"][0]["exp_avg_sq"][0, 0] = float("inf")
        else:
            extra["ema"][1:] = float("-inf")
    name = {"model": "model.0.up (1 non-finite)", "optimizer": "optimizer.state.state.0.exp_avg_sq (1 non-finite)",
            "extra": "extra.ema (2 non-finite)"}[where]
    with pytest.raises(NonFiniteError, match=rf"rosa.save_checkpoint refused: NaN or Inf in {re.escape(name)}"):
        save_checkpoint(directory, run.model, run.optimizer, run.scheduler, run.schedule, extra=extra)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]
    assert_loads_step_1(directory, snapshot)
    save_checkpoint(directory, run.model, run.optimizer, run.scheduler, run.schedule, extra=extra,
                    allow_non_finite=True)
    assert checkpoint.checkpoint_extra(directory)["step"] == 2


# -- bad checkpoints change nothing -----------------------------------------------------------------
def snapshot_run(run: Run) -> tuple:
    return state(run.model), repr(run.optimizer.state_dict()), run.scheduler.state_dict(), run.schedule.state_dict()


def assert_rejected(run: Run, directory, match: str) -> None:
    before = snapshot_run(run)
    counts = [layer.resample_count for layer in rosa.rosa_layers(run.model).values()]
    with pytest.raises(CheckpointError, match=match):
        run.load(directory)
    after = snapshot_run(run)
    assert_same_state(after[0], before[0])
    assert after[1:] == before[1:]
    assert counts == [layer.resample_count for layer in rosa.rosa_layers(run.model).values()]


@pytest.fixture
def trained(tmp_path):
    """A checkpoint after a resample, and a different run (trained 1 step) to load it into."""
    run = Run.build("mlp")
    run.train(0, 4)
    run.save(tmp_path / "ckpt", 4)
    target = Run.build("mlp", init_seed=1)
    target.train(0, 1)
    return tmp_path / "ckpt", target


@pytest.mark.parametrize("name", [checkpoint.MANIFEST, checkpoint.MODEL_FILE, checkpoint.STATE_TENSORS])
def test_missing_file(trained, name):
    directory, target = trained
    (directory / name).unlink()
    assert_rejected(target, directory, f"{name}.* is missing")


def test_corrupted_tensor_bytes(trained):
    directory, target = trained
    path = directory / checkpoint.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_rejected(target, directory, "model.safetensors.* is corrupted")


def test_corrupted_json(trained):
    directory, target = trained
    (directory / checkpoint.MANIFEST).write_text('{"format_version": 1, "lay')
    assert_rejected(target, directory, "not valid JSON")


def test_different_rank_names_layer_and_shapes(trained):
    directory, _ = trained
    other = Run.build("mlp", rank=3)
    assert_rejected(other, directory, r"(?s)ROSA layer '0': rank is 2 in the checkpoint, 3 in the model.*'0.up'")


def test_different_singular_value_placement_is_named(trained):
    directory, _ = trained
    other = Run.build("mlp", singular_values="down")
    assert_rejected(other, directory, "ROSA layer '0': singular_values is 'split' in the checkpoint, 'down' in the model")


def rewrite_manifest(directory, edit, redigest: bool = False) -> None:
    """Apply ``edit`` to the parsed rosa.json of ``directory`` and write it back (with a fresh digest if asked)."""
    path = directory / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    if redigest:
        manifest["digest"] = checkpoint._manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def test_checkpoint_of_an_older_format_is_refused_with_its_version(trained):
    directory, target = trained

    def as_version_1(manifest):
        manifest["format_version"] = 1
        del manifest["digest"]

    rewrite_manifest(directory, as_version_1)
    assert_rejected(target, directory, "format_version 1; this rosa-peft reads version 2 .*older rosa-peft")


def test_edited_layer_metadata_is_detected(trained):
    directory, target = trained
    rewrite_manifest(directory, lambda m: m["layers"][0].update(seed=6))  # digest left as it was
    assert_rejected(target, directory, "rosa.json.* is corrupted .its content differs from its digest")
    rewrite_manifest(directory, lambda m: None, redigest=True)  # the seed changed, digest made to match
    assert_rejected(target, directory, "seed is 6 in the checkpoint, 5 in the model")


def test_resample_counts_travel_as_tensors(trained):
    directory, _ = trained
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    assert "resample_count" not in json.dumps(manifest["layers"])
    saved = load_file(directory / checkpoint.MODEL_FILE)
    assert [int(saved[f"{name}.resamples"]) for name in ("0", "2")] == [1, 1]


def test_missing_digest_is_detected(trained):
    directory, target = trained
    rewrite_manifest(directory, lambda m: m.pop("digest"))
    assert_rejected(target, directory, "its digest is missing")


def square_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return rosa.wrap(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), rosa.RosaConfig(rank=2, seed=5, target_modules=["0", "2"]))


@pytest.mark.parametrize("redigest", [False, True], ids=["manifest_digest", "tensor_digests"])
def test_swapped_index_entries_of_the_same_shape_are_detected(tmp_path, redigest):
    """Each guard alone catches the swap: the manifest's digest, and (that digest recomputed) the tensor digests."""
    save_checkpoint(tmp_path / "ckpt", square_model(0))

    def swap(manifest):
        index = manifest["model"]
        index["0.base.weight"], index["2.base.weight"] = index["2.base.weight"], index["0.base.weight"]

    rewrite_manifest(tmp_path / "ckpt", swap, redigest)
    model = square_model(1)
    before = state(model)
    message = ("the tensor for .0.base.weight. differs from its SHA-256" if redigest
               else "its content differs from its digest")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt", model)
    assert_same_state(state(model), before)


def test_different_layers_and_parameter_names(tmp_path, trained):
    directory, _ = trained
    torch.manual_seed(0)
    model = rosa.wrap(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3), nn.Linear(3, 3)),
                      rosa.RosaConfig(rank=2, target_modules=["0", "2", "3"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    before = state(model)
    with pytest.raises(CheckpointError, match=r"(?s)ROSA layers only in the model: '3'.*"
                                              r"tensors only in the model: '3.up', '3.down', '3.resamples', '3.base.weight'"):
        load_checkpoint(directory, model, optimizer)
    assert_same_state(state(model), before)


def test_mismatched_optimizer_leaves_the_model_unchanged(trained):
    directory, target = trained
    target.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert_rejected(target, directory, "optimizer parameter groups")


def test_missing_optimizer_state(tmp_path, trained):
    _, target = trained
    save_checkpoint(tmp_path / "model_only", Run.build("mlp").model)
    assert_rejected(target, tmp_path / "model_only", "no optimizer state")


def test_unstorable_extra_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="cannot store a object at 'extra.bad'"):
        save_checkpoint(tmp_path / "ckpt", Run.build("mlp").model, extra={"bad": object()})
    assert not (tmp_path / "ckpt").exists()


# -- Hugging Face Trainer resume ---------------------------------------------------------------------
class TokenData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer_run(out_dir, resume=None):
    from transformers import Trainer, TrainingArguments

    from rosa.integrations import RosaCallback

    torch.manual_seed(0)
    model = rosa.wrap(tiny_gpt2(), rosa.RosaConfig(rank=2, seed=1))
    args = TrainingArguments(
        str(out_dir), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=4, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="linear",
    )
    callback = RosaCallback(every_steps=3, rewarmup_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_resume_from_checkpoint_with_rosa_callback_is_exact(tmp_path):
    model, losses = trainer_run(tmp_path / "full")
    resumed, resumed_losses = trainer_run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed_losses == losses
    assert_same_state(state(resumed), state(model))


def test_checkpoint_extra_reads_without_a_model(tmp_path):
    run = Run.build("mlp")
    run.save(tmp_path / "ckpt", 2)
    assert checkpoint.checkpoint_extra(tmp_path / "ckpt") == {"step": 2}
    with pytest.raises(FileNotFoundError):
        checkpoint.checkpoint_extra(tmp_path / "missing")
