"""The held-out learning-rate check of the GLUE table (``benchmarks/glue_heldout.py``)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ROSA_NO_PROGRESS"] = "1"

import json
import statistics

import pytest

pytest.importorskip("peft")

from helpers import GLUE_DIR, load_benchmark, needs_glue  # noqa: E402


def test_source_scores_hold_the_grid_on_the_first_seed_and_the_chosen_lr_on_every_seed():
    heldout = load_benchmark("glue_heldout")
    result = {"runs": {"rosa": {"0.001": {"final_score": 0.5}, "0.002": {"final_score": 0.7}}},
              "chosen": {"rosa": {"lr": 0.002}}, "seeds": {"rosa": [0.7, 0.6, 0.4]}}
    assert heldout.source_scores(result, first_seed=10) == {
        "rosa": {"0.001": {"10": 0.5}, "0.002": {"10": 0.7, "11": 0.6, "12": 0.4}}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny ``glue_table`` report on RTE with 3 seeds: folder and report."""
    out = tmp_path_factory.mktemp("heldout") / "source"
    report = load_benchmark("glue_table").main(["--tiny", "--tasks", "rte", "--seeds", "3", "--data-dir",
                                                str(GLUE_DIR), "--out", str(out)])
    return out, report


def heldout_args(source_dir, out, select_seeds=2):
    return ["--source", str(source_dir), "--select-seeds", str(select_seeds), "--data-dir", str(GLUE_DIR),
            "--out", str(out)]


@pytest.mark.real_model
@needs_glue
def test_each_lr_is_chosen_on_the_selection_seeds_and_scored_on_the_held_out_ones(source, tmp_path, monkeypatch):
    source_dir, source_report = source
    heldout = load_benchmark("glue_heldout")
    report = heldout.main(heldout_args(source_dir, tmp_path))
    assert report["complete"] and report["select_seeds"] == [0, 1] and report["held_out_seeds"] == [2]
    task, given = report["tasks"]["RTE"], source_report["tasks"]["RTE"]
    grid = heldout.BUDGETS["tiny"].lr_grid
    expected_runs = 0
    for method, lrs in grid.items():
        scores, source_lr = task["scores"][method], f"{given['chosen'][method]['lr']:g}"
        # The source's runs are reused as they were: the grid on seed 0 and the chosen LR on every seed.
        assert [scores[source_lr][str(s)] for s in range(3)] == given["seeds"][method]
        assert all(scores[lr]["0"] == run["final_score"] for lr, run in given["runs"][method].items())
        # Every grid LR has both selection seeds; the chosen one has the best mean, the first such in grid order.
        means = [statistics.fmean([scores[f"{lr:g}"]["0"], scores[f"{lr:g}"]["1"]]) for lr in lrs]
        assert task["chosen_lr"][method] == f"{lrs[means.index(max(means))]:g}"
        assert task["selection_means"][method] == pytest.approx(dict(zip((f"{lr:g}" for lr in lrs), means)))
        assert task["seeds"][method] == [scores[task["chosen_lr"][method]]["2"]]
        expected_runs += len(lrs) - 1 + (task["chosen_lr"][method] != source_lr)
    assert task["trained_runs"] == expected_runs
    assert task["reproduced"]["rerun_score"] == task["reproduced"]["source_score"]
    assert report["average"]["rosa"] == pytest.approx(task["seeds"]["rosa"][0])
    assert report["paired"]["rosa_minus_lora"]["RTE"]["mean"] == pytest.approx(
        100 * (task["seeds"]["rosa"][0] - task["seeds"]["lora"][0]))
    md = (tmp_path / "heldout.md").read_text()
    assert md.startswith("# GLUE learning rates chosen on seeds 0 to 1, scored on seed 2 (minilm, rank 8)")
    assert "Status: **complete**." in md and "| method | lr | RTE |" in md and "Targets: " in md
    assert "**" + f"{100 * max(task['selection_means']['rosa'].values()):.1f}" + "**" in md
    assert not (tmp_path / "runs").exists()  # a finished task's runs live in heldout.json only

    # Run again: the finished task is kept, nothing is trained.
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("a finished task was trained again"))
    assert heldout.main(heldout_args(source_dir, tmp_path))["tasks"] == report["tasks"]


@pytest.mark.real_model
@needs_glue
def test_a_source_run_that_does_not_reproduce_stops_before_its_runs_are_reused(source, tmp_path):
    source_dir, source_report = source
    given = json.loads(json.dumps(source_report))
    rosa = given["tasks"]["RTE"]
    rosa["runs"]["rosa"][f"{rosa['chosen']['rosa']['lr']:g}"]["final_score"] += 0.01
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "glue.json").write_text(json.dumps(given))
    heldout = load_benchmark("glue_heldout")
    with pytest.raises(RuntimeError, match="cannot be reused"):
        heldout.main(heldout_args(tmp_path / "source", tmp_path / "out"))
    assert not (tmp_path / "out" / "heldout.json").exists()


@pytest.mark.parametrize("change, message", [
    ("missing", "does not exist"),
    ("partial", "is a partial run"),
    ("budget", "budget glue_table.py no longer defines"),
    ("seeds", "--select-seeds must be from 1 to 2"),
])
def test_a_source_that_cannot_be_checked_is_refused_before_anything_is_written(tmp_path, monkeypatch, change, message):
    heldout = load_benchmark("glue_heldout")
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("trained"))
    budget = json.loads(json.dumps(heldout.glue_table.asdict(heldout.BUDGETS["tiny"])))
    report = {"complete": change != "partial", "budget_name": "tiny", "seeds": 3,
              "budget": {**budget, "epochs": 2} if change == "budget" else budget}
    source = tmp_path / "source"
    if change != "missing":
        source.mkdir()
        (source / "glue.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=message):
        heldout.main(heldout_args(source, tmp_path / "out", select_seeds=3 if change == "seeds" else 2))
    assert not (tmp_path / "out").exists()
