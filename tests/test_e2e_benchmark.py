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
