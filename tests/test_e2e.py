"""Tests for ``rosa e2e`` on tiny random GPT-2 and Llama models with an offline word-level tokenizer."""

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

import rosa  # noqa: E402
from rosa.cli import main  # noqa: E402
from rosa.experiments import e2e  # noqa: E402
from rosa.experiments.e2e_data import E2EExample, format_prompt, group_by_mr, read_e2e_csv, split_by_mr  # noqa: E402
from rosa.experiments.models import load_causal_lm, load_tokenizer  # noqa: E402

from helpers import SHARED_DATA  # noqa: E402
NAMES = ["The Vaults", "Alimentum", "Blue Spice", "Cotto", "Giraffe", "Zizzi", "Aromi", "Loch Fyne"]
FOODS = ["French", "Italian", "English", "Chinese"]
AREAS = ["city centre", "riverside"]


def synthetic_rows() -> list[tuple[str, str]]:
    """E2E-style (mr, ref) rows: 16 MRs with 2 references each."""
    rows = []
    for i, (name, food) in enumerate(itertools.product(NAMES, FOODS[:2])):
        area = AREAS[i % 2]
        mr = f"name[{name}], food[{food}], area[{area}]"
        rows += [(mr, f"{name} serves {food} food in the {area}."),
                 (mr, f"In the {area} there is {name}, a {food} place.")]
    return rows


def write_csv(path: Path, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return path




@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("e2e") / "tiny.csv", synthetic_rows())


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory) -> Path:
    texts = [format_prompt(mr) + " " + ref for mr, ref in synthetic_rows()]
    return e2e.write_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), texts, request.param)


def run_cli(model_dir: Path, data_csv: Path, out: Path, *extra: str) -> dict:
    argv = ["e2e", "--model", str(model_dir), "--data", str(data_csv), "--max-steps", "4", "--batch-size", "4",
            "--resample-every", "2", "--max-eval-mrs", "3", "--max-new-tokens", "5", "--gen-batch-size", "2",
            "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "result.json").read_text())


def test_cli_trains_every_method_and_writes_outputs(model_dir, data_csv, tmp_path, capsys):
    result = run_cli(model_dir, data_csv, tmp_path, "--save")
    printed = capsys.readouterr().out
    assert "| rosa |" in printed and "| lora |" in printed and "| full |" in printed
    assert "byte-identical of 3 generations" in printed
    for name in ("result.json", "summary.md", "samples.md", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    methods = result["methods"]
    assert set(methods) == {"rosa", "lora", "full"}
    for r in methods.values():
        assert len(r["train_loss_curve"]) == r["steps"] == 4
        assert set(r["metrics"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
        assert len(r["generations"]) == result["data"]["eval_mrs"] == 3
        assert r["train_tokens_per_second"] > 0 and r["peak_memory"]["mb"] > 0
    assert methods["rosa"]["resample_steps"] == [2] and methods["lora"]["resample_steps"] == []
    trainable = {name: r["trainable_params"] for name, r in methods.items()}
    assert trainable["rosa"] == trainable["lora"] < trainable["full"]
    check = methods["rosa"]["merge_check"]
    assert check["identical"] and check["generations_compared"] == 3 and check["max_abs_logit_diff"] < 1e-4
    samples = (tmp_path / "samples.md").read_text()
    assert "| reference 1 |" in samples and "| rosa |" in samples
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model-rosa")  # plain transformers, no rosa layers
    assert not rosa.rosa_layers(saved)


def test_labels_put_loss_on_target_tokens_only(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the eos target must still carry loss
    short = E2EExample("name[Cotto], food[French], area[riverside]", "Cotto serves French food.")
    long = E2EExample("name[Zizzi], food[Italian], area[city centre]",
                      "In the city centre there is Zizzi, a Italian place.")
    encoded = [e2e.encode_example(tokenizer, ex, max_length=64) for ex in (short, long)]
    prompt = tokenizer(format_prompt(short.mr))["input_ids"]
    target = tokenizer(" " + short.ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded[0] == {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    batch = e2e.collate_training(encoded, tokenizer.pad_token_id)
    width = len(encoded[1]["input_ids"])
    n_short = len(prompt) + len(target)
    assert batch["labels"].shape == batch["input_ids"].shape == (2, width)
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + target + [-100] * (width - n_short)
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (width - n_short)
    assert batch["input_ids"][0, n_short:].eq(tokenizer.pad_token_id).all()

    cut = e2e.encode_example(tokenizer, short, max_length=len(prompt) + 2)
    assert cut["labels"] == [-100] * len(prompt) + target[:2]
    with pytest.raises(ValueError, match="raise --max-length"):
        e2e.encode_example(tokenizer, short, max_length=len(prompt))


def test_runner_split_is_split_by_mr(data_csv):
    settings = e2e.E2ESettings(data=str(data_csv), eval_fraction=0.25, seed=3)
    train, held_out = e2e.read_groups(settings)
    expected = split_by_mr(group_by_mr(read_e2e_csv(data_csv)), 0.25, 3)
    assert (train, held_out) == expected
    assert not {g.mr for g in train} & {g.mr for g in held_out}


def test_runner_split_of_real_dev_set_never_leaks_an_mr(model_dir):
    dev = SHARED_DATA / "e2e" / "dev.csv"
    if not dev.is_file():
        pytest.skip(f"{dev} is missing (set ROSA_SHARED_DATA to the shared data folder)")
    s = e2e.E2ESettings(data=str(dev), max_eval_mrs=60)
    data = e2e.build_data(s, e2e.read_groups(s), load_tokenizer(str(model_dir)))
    assert data.sizes["mrs_in_both"] == 0 and data.sizes["eval_mrs"] == 60
    assert data.sizes["train_mrs"] + data.sizes["eval_mrs_total"] == 547
    assert not {ex.mr for ex in data.train} & {g.mr for g in data.eval}


def test_merged_rosa_model_generates_the_same_text(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    model = rosa.wrap(load_causal_lm(str(model_dir)), rosa.RosaConfig(rank=4, seed=0))
    with torch.no_grad():  # stand in for training: move the factors well away from their start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    rows = synthetic_rows()[::6]
    prompts = [e2e.encode_prompt(tokenizer, mr) for mr, _ in rows]
    s = e2e.E2ESettings(max_new_tokens=8, gen_batch_size=2)
    merged, texts, check = e2e.merge_and_compare(model, tokenizer, prompts, s)
    assert not rosa.rosa_layers(merged)
    assert check["identical"] and check["generations_compared"] == len(rows)
    assert check["max_abs_logit_diff"] < 1e-4
    one_by_one = [e2e.generate(merged, tokenizer, [p], s, desc="single")[0] for p in prompts]
    assert texts == one_by_one  # left-padded batches decode exactly like single prompts
    beams = e2e.generate(merged, tokenizer, prompts, replace(s, num_beams=3), desc="beam search")
    assert len(beams) == len(prompts) and all(isinstance(text, str) for text in beams)


def test_malformed_csv_row_is_reported_with_file_and_line(tmp_path, model_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text('mr,ref\n"name[A]",A is good.\n"name[B]",B is good.\n"name[C]",C is,"an extra field"\n')
    with pytest.raises(SystemExit, match=rf"{bad}:4: expected 2 fields"):
        main(["e2e", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("argv, message", [
    ([], "no E2E data given: pass --data"),
    (["--train-file", "a.csv"], "--train-file and --eval-file go together"),
    (["--data", "a.csv", "--hub"], "give one data source, not --data and --hub"),
    (["--data", "a.csv", "--max-steps", "0"], "--max-steps must be >= 1"),
])
def test_bad_options_exit_with_a_clear_message(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["e2e", "--out", str(tmp_path), *argv])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    texts = [format_prompt(mr) + " " + ref for mr, ref in synthetic_rows()]
    return e2e.write_tiny_model(tmp_path_factory.mktemp("tiny-llama-resume"), texts, "llama")


def resumable_cli(model_dir: Path, data_csv: Path, out: Path, *extra: str) -> dict:
    """6 steps of 3 batches per epoch: checkpoints at 2, 4 and 6, a resample at 3 and an LR re-warmup
    over steps 4 and 5, epochs begin at 1, 4."""
    return run_cli(model_dir, data_csv, out, "--methods", "rosa", "--epochs", "2", "--max-steps", "6", "--resample-every", "3",
                   "--rewarmup-steps", "2", "--max-train-examples", "12", "--checkpoint-every", "2", *extra)


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the training loop raise in its ``step``-th optimizer step (at gradient clipping)."""
    calls = itertools.count(1)
    clip = torch.nn.utils.clip_grad_norm_

    def clip_or_crash(*args, **kwargs):
        if next(calls) == step:
            raise KeyboardInterrupt(f"simulated crash at step {step}")
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_or_crash)


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(llama_dir, data_csv, tmp_path, monkeypatch):
    expected = resumable_cli(llama_dir, data_csv, tmp_path / "whole")["methods"]["rosa"]
    assert expected["resample_steps"] == [3] and not (tmp_path / "whole" / "checkpoints" / "rosa").exists()

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)  # after the checkpoint of step 4: 2nd epoch, 1 batch in, mid re-warmup
        with pytest.raises(KeyboardInterrupt):
            resumable_cli(llama_dir, data_csv, out)
    assert rosa.checkpoint.is_checkpoint(out / "checkpoints" / "rosa")
    with pytest.raises(SystemExit, match="pass --resume"):
        resumable_cli(llama_dir, data_csv, out)
    resumed = resumable_cli(llama_dir, data_csv, out, "--resume")["methods"]["rosa"]
    for key in ("train_loss_curve", "resample_steps", "train_tokens", "generations", "metrics", "merge_check"):
        assert resumed[key] == expected[key], key
    assert not (out / "checkpoints" / "rosa").exists()  # deleted after the successful run


def test_resume_of_finished_training_goes_straight_to_generation(model_dir, data_csv, tmp_path, monkeypatch):
    expected = run_cli(model_dir, data_csv, tmp_path, "--keep-checkpoints")["methods"]
    for method in expected:
        assert rosa.checkpoint.is_checkpoint(tmp_path / "checkpoints" / method)
    crash_at_step(monkeypatch, 1)  # any training step would raise
    resumed = run_cli(model_dir, data_csv, tmp_path, "--resume", "--num-beams", "2")["methods"]
    for method, r in resumed.items():
        assert r["train_loss_curve"] == expected[method]["train_loss_curve"]
        assert r["resample_steps"] == expected[method]["resample_steps"]
        assert len(r["generations"]) == 3


def test_resume_with_other_settings_is_refused_naming_them(llama_dir, data_csv, tmp_path):
    resumable_cli(llama_dir, data_csv, tmp_path, "--keep-checkpoints")
    with pytest.raises(SystemExit, match=r"(?s)other settings:.*lr: 0\.001 in the checkpoint, 0\.01 now.*rank: 8"):
        resumable_cli(llama_dir, data_csv, tmp_path, "--resume", "--lr", "0.01", "--rank", "4")
    with pytest.raises(SystemExit, match="train_data_sha256"):
        resumable_cli(llama_dir, data_csv, tmp_path, "--resume", "--max-train-examples", "11")
    with pytest.raises(SystemExit, match="rewarmup_steps: 2 in the checkpoint, 1 now"):
        resumable_cli(llama_dir, data_csv, tmp_path, "--resume", "--rewarmup-steps", "1")
