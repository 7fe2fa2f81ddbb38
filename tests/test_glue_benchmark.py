"""The GLUE benchmark script on its ``--tiny`` budget (real MiniLM and real GLUE files)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ROSA_NO_PROGRESS"] = "1"

import json

import pytest

pytest.importorskip("peft")

from helpers import SHARED_DATA, load_benchmark  # noqa: E402

GLUE_DIR = SHARED_DATA / "glue"


@pytest.mark.real_model
@pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(), reason=f"GLUE data not found under {GLUE_DIR}")
def test_tiny_budget_writes_json_and_markdown(tmp_path):
    bench = load_benchmark("glue_table")
    report = bench.main(["--tiny", "--tasks", "sts-b", "--data-dir", str(GLUE_DIR), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "glue.json").read_text())
    assert saved["complete"] and saved["budget_name"] == "tiny" and list(saved["tasks"]) == ["STS-B"]
    grid = bench.BUDGETS["tiny"].lr_grid
    for task in saved["tasks"].values():
        assert task["data"]["train_samples"] == 16 and task["data"]["subsampled"]
        for method, runs in task["runs"].items():
            assert sorted(runs) == sorted(f"{lr:g}" for lr in grid[method])
            best = max(runs.values(), key=lambda r: r["final_score"])
            assert task["chosen"][method]["lr"] == best["lr"]
    assert set(saved["targets"]) >= {"rosa_ge_lora_on_3_of_4_tasks", "rosa_within_1_point_of_full"}
    assert saved["average"] == report["average"]
    md = (tmp_path / "glue.md").read_text()
    assert "| method | STS-B | average | trainable params |" in md
    assert "Status: **complete**." in md and "**Subsampled**" in md and "Chosen learning rates:" in md
    assert "| rosa |" in md and "| lora |" in md and "| full |" in md
    assert "Step time, ROSA vs LoRA timed alternately" in md
    assert saved["step_time"]["rosa_seconds"] > 0 and saved["targets"]["rosa_over_lora_step_time"] > 0


def test_resume_keeps_finished_tasks_and_refuses_other_settings(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    finished = {"data": {"subsampled": True}, "runs": {}, "chosen": {}}
    report = {"benchmark": "glue", "budget_name": "tiny", "budget": bench.asdict(bench.BUDGETS["tiny"]),
              "model": "minilm", "rank": 8, "seed": 0, "tasks": {"STS-B": finished}, "total_seconds": 5.0}
    (tmp_path / "glue.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="was run with"):
        bench.main(["--tiny", "--tasks", "sts-b", "--rank", "4", "--resume", "--out", str(tmp_path)])
    monkeypatch.setattr(bench, "run_task", lambda *a: pytest.fail("a finished task was run again"))
    monkeypatch.setattr(bench, "step_time_ab", lambda *a: {})
    monkeypatch.setattr(bench, "write_report", lambda *a: None)
    monkeypatch.setattr(bench, "markdown", lambda *a: "")
    resumed = bench.main(["--tiny", "--tasks", "sts-b", "--resume", "--out", str(tmp_path)])
    assert resumed["tasks"] == {"STS-B": finished} and resumed["total_seconds"] >= 5.0
