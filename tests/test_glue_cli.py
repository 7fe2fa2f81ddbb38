"""``rosa glue`` end to end on real RTE data and MiniLM (tiny budgets), and its error messages."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ROSA_NO_PROGRESS"] = "1"

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rosa.checkpoint

pytest.importorskip("peft")

from rosa.cli import main  # noqa: E402
from rosa.experiments import glue  # noqa: E402

from helpers import GLUE_DIR, needs_glue  # noqa: E402
TINY = ["--max-train-samples", "16", "--max-eval-samples", "16", "--max-length", "32", "--epochs", "1",
        "--batch-size", "4"]


def run_cli(*argv: str) -> int:
    return main(["glue", *argv])


@pytest.mark.real_model
@needs_glue
def test_rte_end_to_end_for_all_methods(tmp_path, capsys):
    out = tmp_path / "rte"
    assert run_cli("--task", "rte", "--data-dir", str(GLUE_DIR), *TINY, "--resample-every", "2",
                   "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| rosa |" in printed and "| lora |" in printed and "| full |" in printed
    assert (out / "glue.png").stat().st_size > 0
    result = json.loads((out / "result.json").read_text())

    assert result["task"] == "RTE"
    assert result["data"] == {"train_samples": 16, "train_total": 2490, "eval_samples": 16, "eval_total": 277,
                              "subsampled": True}
    assert result["settings"]["max_length"] == 32 and result["machine"]["torch"] == torch.__version__
    methods = result["methods"]
    assert list(methods) == ["rosa", "lora", "full"]
    for name, r in methods.items():
        assert r["steps"] == 4 and len(r["train_loss_curve"]) == 4
        assert [e["epoch"] for e in r["epochs"]] == [1]
        assert set(r["final_dev"]) == {"accuracy", "score"} and 0 <= r["final_score"] <= 1
        assert r["wall_seconds"] > 0 and r["peak_memory"]["mb"] > 0
    assert methods["rosa"]["resample_steps"] == [2]  # the one due at the last step (4) is skipped
    assert methods["lora"]["resample_steps"] == methods["full"]["resample_steps"] == []
    assert methods["rosa"]["trainable_params"] == methods["lora"]["trainable_params"]
    assert methods["rosa"]["trainable_params"] < methods["full"]["trainable_params"] / 50
    assert methods["rosa"]["lr"] == glue.DEFAULT_LR["rosa"] and methods["full"]["lr"] == glue.DEFAULT_LR["full"]


RELOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForSequenceClassification
    inputs = torch.load(sys.argv[1])
    logits = {}
    for folder in sys.argv[3:]:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits[folder] = model(**inputs).logits
    assert not any(name == "rosa" or name.startswith(("rosa.", "peft")) for name in sys.modules), "rosa/peft imported"
    torch.save(logits, sys.argv[2])
""")


@pytest.mark.real_model
@needs_glue
def test_saved_merged_models_reload_with_plain_transformers(tmp_path):
    settings = glue.GlueSettings(task="RTE", data_dir=str(GLUE_DIR), epochs=1, batch_size=4, max_length=32,
                                 max_train_samples=8, max_eval_samples=4, resample_every=1)
    tokenizer = glue.load_tokenizer(settings.model)
    data = glue.load_data(settings, tokenizer)
    inputs = dict(tokenizer(["A cat sat on the mat.", "Dogs bark"], ["A cat is sitting.", "Cats meow loudly"],
                            padding=True, return_tensors="pt"))
    expected = {}
    for method in ("rosa", "lora"):
        folder = str(tmp_path / method)
        run = glue.train_method(method, 1e-2, settings, data, tokenizer, save_dir=Path(folder))
        assert run.result["saved_to"] == folder
        with torch.no_grad():
            expected[folder] = run.model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt"),
                    *expected], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reloaded = torch.load(tmp_path / "logits.pt")
    for folder, logits in expected.items():
        assert torch.equal(reloaded[folder], logits), folder
    assert (tmp_path / "rosa" / "tokenizer.json").is_file()


def test_unknown_task_lists_the_tasks(capsys):
    with pytest.raises(SystemExit, match=r"unknown GLUE task 'XNLI'; known tasks: CoLA, SST-2, MRPC, STS-B"):
        run_cli("--task", "XNLI", "--data-dir", "unused")


def test_missing_data_dir_says_how_to_pass_it():
    with pytest.raises(SystemExit, match="pass --data-dir"):
        run_cli("--task", "RTE", "--model", "not-loaded-options-are-checked-first")


def test_bad_option_is_named():
    with pytest.raises(SystemExit, match="--epochs must be >= 1, got 0"):
        run_cli("--task", "RTE", "--data-dir", "unused", "--epochs", "0")


def test_singular_value_placement_reaches_the_settings_and_the_resume_check():
    parser = argparse.ArgumentParser()
    glue.add_arguments(parser)
    args = parser.parse_args(["--task", "rte", "--data-dir", "unused", "--singular-values", "down"])
    settings = glue.settings_from_args(args)
    assert settings.singular_values == "down"
    assert glue.resume_settings(settings, 1e-3)["singular_values"] == "down"  # a split checkpoint is not resumed
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "rte", "--singular-values", "sqrt"])


def test_malformed_tsv_names_file_and_line(tmp_path):
    task_dir = tmp_path / "RTE"
    task_dir.mkdir()
    header = "index\tsentence1\tsentence2\tlabel\n"
    (task_dir / "train.tsv").write_text(header + "0\tA\tB\tentailment\n1\tonly two\tcolumns\n")
    (task_dir / "dev.tsv").write_text(header + "0\tA\tB\tentailment\n")
    no_model = tmp_path / "no-model-here"  # the data is read, and rejected, before any model is loaded
    with pytest.raises(SystemExit, match=rf"{task_dir / 'train.tsv'}: line 3: expected at least 4"):
        run_cli("--task", "RTE", "--data-dir", str(tmp_path), "--model", str(no_model))
    (task_dir / "train.tsv").write_text(header + "0\tA\tB\tmaybe\n")
    with pytest.raises(SystemExit, match=r"train.tsv: line 2: label 'maybe' is not one of"):
        run_cli("--task", "RTE", "--data-dir", str(tmp_path), "--model", str(no_model))
    (task_dir / "train.tsv").write_text(header + "0\tA\tB\tentailment\n")
    with pytest.raises(SystemExit, match=rf"model folder {no_model} does not exist"):  # good data: now the model
        run_cli("--task", "RTE", "--data-dir", str(tmp_path), "--model", str(no_model))


def test_length_grouped_batches_cover_every_example_once_and_reshuffle():
    lengths = [(7 * i) % 23 for i in range(100)]
    sampler = glue.LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 13
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(100))
    assert first != second  # a new order every epoch
    again = list(glue.LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(0)))
    assert again == first  # but reproducible from the seed
    evaluation = [i for batch in glue.LengthGroupedBatches(lengths, 8) for i in batch]
    assert [lengths[i] for i in evaluation] == sorted(lengths)


RESUMABLE = ["--task", "RTE", "--data-dir", str(GLUE_DIR), "--max-train-samples", "16", "--max-eval-samples", "16",
             "--max-length", "32", "--epochs", "2", "--batch-size", "4", "--methods", "rosa", "--rewarmup-steps", "2"]


def interrupt_at_second_evaluation(monkeypatch) -> None:
    """Make ``rosa glue`` crash while evaluating epoch 2, after epoch 1's checkpoint was written."""
    evaluate, calls = glue.evaluate, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted in epoch 2")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(glue, "evaluate", crashing)


@pytest.mark.real_model
@needs_glue
def test_resume_after_an_interrupted_epoch_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    run_cli(*RESUMABLE, "--out", str(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())["methods"]["rosa"]
    assert not (tmp_path / "whole" / "checkpoints").exists()  # deleted after success by default

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at_second_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            run_cli(*RESUMABLE, "--out", str(out))
    assert rosa.checkpoint.is_checkpoint(out / "checkpoints" / "rosa")
    with pytest.raises(SystemExit, match=r"other settings: .*lr 0\.001 \(checkpoint\) vs 0\.01 \(now\)"):
        run_cli(*RESUMABLE, "--out", str(out), "--resume", "--lr", "0.01")

    run_cli(*RESUMABLE, "--out", str(out), "--resume", "--keep-checkpoints")
    resumed = json.loads((out / "result.json").read_text())["methods"]["rosa"]
    assert resumed["epochs"] == whole["epochs"] and len(resumed["epochs"]) == 2
    assert resumed["train_loss_curve"] == whole["train_loss_curve"]
    assert resumed["resample_steps"] == whole["resample_steps"] == [4]

    evaluations = []
    monkeypatch.setattr(glue, "evaluate", lambda *args: evaluations.append(args))
    run_cli(*RESUMABLE, "--out", str(out), "--resume")  # every epoch done: nothing is retrained
    again = json.loads((out / "result.json").read_text())["methods"]["rosa"]
    assert evaluations == []
    assert again["epochs"] == resumed["epochs"] and again["wall_seconds"] == resumed["wall_seconds"]
    assert not (out / "checkpoints").exists()
