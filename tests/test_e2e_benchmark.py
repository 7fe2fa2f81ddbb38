"""The E2E benchmark script on its ``--tiny`` budget (a tiny random Llama on the real E2E dev set)."""

import json

import pytest

pytest.importorskip("peft")

from helpers import SHARED_DATA, load_benchmark  # noqa: E402

DEV_CSV = SHARED_DATA / "e2e" / "dev.csv"


@pytest.mark.skipif(not DEV_CSV.is_file(), reason=f"E2E data not found at {DEV_CSV}")
def test_tiny_budget_writes_json_markdown_samples_and_plot(tmp_path):
    bench = load_benchmark("e2e_table")
    report = bench.main(["--tiny", "--data", str(DEV_CSV), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["budget_name"] == "tiny" and saved["targets"] == report["targets"]
    assert set(saved["targets"]) == {"rosa_ge_lora_bleu", "rosa_ge_lora_rouge_l", "rosa_merged_generations_identical"}
    assert saved["targets"]["rosa_merged_generations_identical"]
    methods = saved["result"]["methods"]
    assert set(methods) == {"rosa", "lora", "full"}
    assert {r["steps"] for r in methods.values()} == {bench.BUDGETS["tiny"].steps}  # the same budget for all
    assert saved["result"]["data"]["mrs_in_both"] == 0 and saved["result"]["data"]["eval_mrs"] == 4
    md = (tmp_path / "e2e.md").read_text()
    assert "| method | BLEU | NIST | METEOR | ROUGE-L | CIDEr |" in md
    assert "[e2e.samples.md](e2e.samples.md)" in md and "Targets: ROSA >= LoRA on BLEU:" in md
    assert "| rosa |" in md and "| lora |" in md and "| full |" in md and "tiny random Llama" in md
    assert "| reference 1 |" in (tmp_path / "e2e.samples.md").read_text()
    assert (tmp_path / "e2e.loss.png").stat().st_size > 0


@pytest.mark.skipif(not DEV_CSV.is_file(), reason=f"E2E data not found at {DEV_CSV}")
def test_an_interrupted_run_resumes_without_retraining_finished_methods(tmp_path, monkeypatch):
    bench = load_benchmark("e2e_table")
    argv = ["--tiny", "--data", str(DEV_CSV), "--out", str(tmp_path)]
    uninterrupted = bench.main([*argv, "--out", str(tmp_path / "reference")])
    assert not (tmp_path / "reference" / bench.WORK).exists()  # the work folder goes once the run is done

    real_run_method, started = bench.e2e.run_method, []

    def crash_in_lora(method, *args, **kwargs):
        started.append(method)
        if method == "lora" and started.count("lora") == 1:
            raise KeyboardInterrupt
        return real_run_method(method, *args, **kwargs)

    monkeypatch.setattr(bench.e2e, "run_method", crash_in_lora)
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    with pytest.raises(SystemExit, match=r"e2e-run holds an interrupted run; pass --resume"):
        bench.main(argv)
    real_step, steps = bench.e2e.optimizer_step, []
    monkeypatch.setattr(bench.e2e, "optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    resumed = bench.main([*argv, "--resume"])
    assert started == ["rosa", "lora", "rosa", "lora", "full"]
    assert len(steps) == 2 * bench.BUDGETS["tiny"].steps  # ROSA came back from its final checkpoint untrained
    for method in ("rosa", "lora", "full"):
        assert (resumed["result"]["methods"][method]["train_loss_curve"]
                == uninterrupted["result"]["methods"][method]["train_loss_curve"])
        assert resumed["result"]["methods"][method]["metrics"] == uninterrupted["result"]["methods"][method]["metrics"]
    assert resumed["resumed"] and "resumed after an interruption" in (tmp_path / "e2e.md").read_text()
    assert not (tmp_path / bench.WORK).exists()
