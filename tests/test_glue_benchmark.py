"""The GLUE benchmark script on its ``--tiny`` budget (real MiniLM and real GLUE files)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ROSA_NO_PROGRESS"] = "1"

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("peft")

from helpers import GLUE_DIR, REPO, load_benchmark, needs_glue  # noqa: E402


@pytest.mark.real_model
@needs_glue
def test_tiny_budget_with_two_workers_writes_json_and_markdown(tmp_path):
    """The script as users run it, two tasks in two worker processes."""
    command = [sys.executable, "-m", "benchmarks.glue_table", "--tiny", "--tasks", "rte", "sts-b",
               "--workers", "2", "--seeds", "2", "--data-dir", str(GLUE_DIR), "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    bench = load_benchmark("glue_table")
    saved = json.loads((tmp_path / "glue.json").read_text())
    assert saved["complete"] and saved["budget_name"] == "tiny" and saved["workers"] == 2
    assert list(saved["tasks"]) == ["RTE", "STS-B"]
    grid = bench.BUDGETS["tiny"].lr_grid
    for task in saved["tasks"].values():
        assert task["data"]["train_samples"] == 16 and task["data"]["subsampled"]
        for method, runs in task["runs"].items():
            assert sorted(runs) == sorted(f"{lr:g}" for lr in grid[method])
            best = max(runs.values(), key=lambda r: r["final_score"])
            assert task["chosen"][method]["lr"] == best["lr"]
    assert set(saved["targets"]) >= {"rosa_ge_lora_on_3_of_4_tasks", "rosa_within_1_point_of_full"}
    for task in saved["tasks"].values():
        for method, scores in task["seeds"].items():
            assert len(scores) == 2 and scores[0] == task["chosen"][method]["final_score"]
    means = [sum(t["seeds"]["rosa"]) / 2 for t in saved["tasks"].values()]
    assert saved["average"]["rosa"] == pytest.approx(sum(means) / 2)
    md = (tmp_path / "glue.md").read_text()
    assert "| method | RTE | STS-B | average | trainable params |" in md
    assert "Status: **complete**." in md and "**Subsampled**" in md and "Chosen learning rates, and the seed-0 scores" in md
    assert "| rosa |" in md and "| lora |" in md and "| full |" in md
    assert "Step time, ROSA vs LoRA timed alternately" in md and "2 task(s) trained at a time" in md
    assert " ± " in md and "over 2 seed(s)" in md and "Same for every method: seeds 0 to 1," in md
    assert saved["step_time"]["rosa_seconds"] > 0 and saved["targets"]["rosa_over_lora_step_time"] > 0

    # Widen its grids in two workers: each task's rerun of its chosen ROSA run, in a fresh process, scores the same.
    subprocess.run([*command[:-1], str(tmp_path / "wide"), "--widen", str(tmp_path)], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    wide = json.loads((tmp_path / "wide" / "glue.json").read_text())
    assert wide["complete"] and wide["widen"] == str(tmp_path)
    for task in wide["tasks"].values():
        assert task["reproduced"]["rerun_score"] == task["reproduced"]["source_score"]
        for method, runs in task["runs"].items():
            assert len(runs) == len(grid[method]) + 1  # the tiny grids have two LRs: every choice is at an end
            assert task["chosen"][method] == max(runs.values(), key=lambda r: r["final_score"])
            assert len(task["seeds"][method]) == 2 and task["seeds"][method][0] == task["chosen"][method]["final_score"]


def test_resume_keeps_finished_tasks_and_refuses_other_settings(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    finished = {"data": {"subsampled": True}, "runs": {}, "chosen": {}, "seeds": {"rosa": [0.1, 0.2, 0.3]}}
    report = {"benchmark": "glue", "budget_name": "tiny", "budget": bench.asdict(bench.BUDGETS["tiny"]),
              "model": "minilm", "rank": 8, "seed": 0, "tasks": {"STS-B": finished}, "total_seconds": 5.0,
              "machine": {"date": "2026-01-01 00:00:00 UTC"}}
    (tmp_path / "glue.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="was run with"):
        bench.main(["--tiny", "--tasks", "sts-b", "--rank", "4", "--resume", "--out", str(tmp_path)])
    monkeypatch.setattr(bench, "run_grid", lambda *a: pytest.fail("a finished grid was run again"))
    monkeypatch.setattr(bench, "run_seeds", lambda *a: pytest.fail("finished seeds were run again"))
    monkeypatch.setattr(bench, "step_time_ab", lambda *a: {})
    monkeypatch.setattr(bench, "write_report", lambda *a: "")
    resumed = bench.main(["--tiny", "--tasks", "sts-b", "--resume", "--out", str(tmp_path)])
    assert resumed["tasks"] == {"STS-B": finished} and resumed["total_seconds"] >= 5.0
    assert resumed["run_dates"] == ["2026-01-01 00:00:00 UTC", resumed["machine"]["date"]]
    assert bench.run_dates(resumed) == f"2026-01-01 00:00:00 UTC (resumed {resumed['machine']['date']})"
    assert bench.run_dates({"machine": {"date": "2026-01-02"}}) == "2026-01-02"  # reports from before run_dates

    monkeypatch.setattr(bench, "run_seeds", lambda task, result, *a: {"rosa": [0.5, 0.6]})
    resumed = bench.main(["--tiny", "--tasks", "sts-b", "--resume", "--seeds", "2", "--out", str(tmp_path)])
    assert resumed["tasks"]["STS-B"]["seeds"] == {"rosa": [0.5, 0.6]}  # only the seed repeats were rerun
    with pytest.raises(SystemExit, match="--workers must be at least 1"):
        bench.main(["--tiny", "--workers", "0", "--out", str(tmp_path)])


def test_budget_option_names_a_budget_and_resume_refuses_another_one(tmp_path):
    bench = load_benchmark("glue_table")
    assert bench.parse_args(["--budget", "long"]).budget == "long"
    assert bench.parse_args(["--tiny"]).budget == "tiny" and bench.parse_args([]).budget == "default"
    long, default = bench.BUDGETS["long"], bench.BUDGETS["default"]
    assert long.epochs > default.epochs and long.train_samples == default.train_samples  # same subsets, longer
    (tmp_path / "glue.json").write_text(json.dumps({"budget_name": "default", "budget": bench.asdict(default),
                                                    "model": "minilm", "rank": 8, "seed": 0}))
    with pytest.raises(SystemExit, match="'budget_name': 'default'"):
        bench.main(["--budget", "long", "--resume", "--out", str(tmp_path)])


def test_seed_repeats_run_only_the_seeds_a_task_lacks(monkeypatch):
    bench = load_benchmark("glue_table")
    calls = []
    monkeypatch.setattr(bench.glue, "load_tokenizer", lambda model: None)
    monkeypatch.setattr(bench.glue, "load_data", lambda settings, tokenizer: None)
    monkeypatch.setattr(bench, "train", lambda m, lr, settings, *a: calls.append((m, lr, settings.seed)) or
                        {"final_score": settings.seed / 10})
    chosen = {m: {"lr": 1e-3, "final_score": 0.0} for m in bench.METHODS}
    result = {"chosen": chosen, "seeds": {m: [0.0, 0.1] for m in bench.METHODS}}
    args = bench.parse_args(["--tiny", "--seeds", "3"])
    scores = bench.run_seeds("RTE", result, bench.BUDGETS["tiny"], args, bench.METHODS)
    assert calls == [(m, 1e-3, 2) for m in bench.METHODS]  # seeds 0 and 1 are kept, only seed 2 runs
    assert scores == {m: [0.0, 0.1, 0.2] for m in bench.METHODS}
    calls.clear()
    args = bench.parse_args(["--tiny", "--seeds", "1"])
    assert bench.run_seeds("RTE", result, bench.BUDGETS["tiny"], args, bench.METHODS) == {m: [0.0] for m in bench.METHODS}
    assert calls == []
    calls.clear()
    del result["seeds"]["lora"]  # LoRA has only its grid run (its choice moved in a --widen): it reruns seed 1 alone
    scores = bench.run_seeds("RTE", result, bench.BUDGETS["tiny"], bench.parse_args(["--tiny", "--seeds", "3"]),
                             bench.METHODS)
    assert calls == [("lora", 1e-3, 1), *((m, 1e-3, 2) for m in bench.METHODS)]
    assert scores == {"rosa": [0.0, 0.1, 0.2], "lora": [0.0, 0.1, 0.2], "full": [0.0, 0.1, 0.2]}


def test_seed_range_names_one_seed_or_a_span():
    bench = load_benchmark("glue_table")
    assert bench.seed_range(0, 1) == "seed 0"
    assert bench.seed_range(3, 2) == "seeds 3 to 4"


def test_a_crash_while_adding_seeds_keeps_every_grid_in_glue_json(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")

    def task(scores: list[float]) -> dict:
        return {"data": {"subsampled": True}, "runs": {"0.001": {"final_score": scores[0]}}, "chosen": {},
                "seeds": {m: scores for m in bench.METHODS}}

    report = {"benchmark": "glue", "budget_name": "tiny", "budget": bench.asdict(bench.BUDGETS["tiny"]),
              "model": "minilm", "rank": 8, "seed": 0, "tasks": {"RTE": task([0.5]), "STS-B": task([0.8])},
              "total_seconds": 5.0, "machine": {"date": "2026-01-01 00:00:00 UTC"}}
    (tmp_path / "glue.json").write_text(json.dumps(report))
    monkeypatch.setattr(bench, "markdown", lambda report: "")

    def first_task_then_crash(todo, budget, args, baseline, widen):
        assert list(todo) == ["RTE", "STS-B"]
        yield "RTE", task([0.5, 0.6])
        raise KeyboardInterrupt  # the run dies before STS-B's new seed is done

    monkeypatch.setattr(bench, "run_tasks", first_task_then_crash)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--tasks", "rte", "sts-b", "--resume", "--seeds", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "glue.json").read_text())
    assert saved["tasks"] == {"RTE": task([0.5, 0.6]), "STS-B": task([0.8])} and not saved["complete"]

    todos = []
    monkeypatch.setattr(bench, "run_tasks", lambda todo, budget, args, baseline, widen: todos.append(todo) or iter(()))
    monkeypatch.setattr(bench, "step_time_ab", lambda *a: {})
    monkeypatch.setattr(bench, "target_checks", lambda *a: {})
    bench.main(["--tiny", "--tasks", "rte", "sts-b", "--resume", "--seeds", "2", "--out", str(tmp_path)])
    assert todos == [{"STS-B": task([0.8])}]  # resuming again reruns only STS-B's missing seed, with its grid


def test_paired_difference_matches_a_hand_computed_case_and_scipys_paired_t_interval():
    bench = load_benchmark("glue_table")
    hand = bench.paired_difference([0.03, 0.05, 0.07], [0.02, 0.03, 0.04])  # differences 1, 2, 3 (x100)
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, 2 dof) * stdev 1 / sqrt(3)
    assert hand["mean"] == pytest.approx(2.0) and hand["ci95"] == pytest.approx([2 - half, 2 + half])
    assert hand["seeds"] == 3

    stats = pytest.importorskip("scipy.stats")
    a, b = [0.61, 0.55, 0.72, 0.58, 0.66], [0.60, 0.57, 0.69, 0.52, 0.66]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert bench.paired_difference(a, b)["ci95"] == pytest.approx([100 * ci.low, 100 * ci.high])
    assert bench.paired_difference([0.5], [0.25]) == {"mean": 25.0, "ci95": None, "seeds": 1}
    with pytest.raises(ValueError):  # unequal seed counts cannot pair up
        bench.paired_difference([0.5, 0.6], [0.5])


def test_the_targets_line_keeps_three_decimals_of_each_number():
    bench = load_benchmark("glue_table")
    line = bench.targets_line({"rosa_ge_lora_tasks": ["RTE"], "rosa_over_lora_step_time": 1.0041, "met": False})
    assert line == "Targets: rosa_ge_lora_tasks = ['RTE'], rosa_over_lora_step_time = 1.004, met = False"


def test_paired_comparisons_pair_tasks_by_seed_and_average_each_seed_over_tasks():
    bench = load_benchmark("glue_table")
    scores = {"RTE": {"rosa": [0.50, 0.56], "lora": [0.52, 0.50], "full": [0.55, 0.53]},
              "STS-B": {"rosa": [0.80, 0.82], "lora": [0.81, 0.80], "full": [0.78, 0.79]}}
    tasks = {t: {"seeds": s} for t, s in scores.items()}
    paired = bench.paired_comparisons(tasks)
    assert paired["rosa_minus_lora"]["RTE"]["mean"] == pytest.approx(2.0)  # (-2 + 6) / 2
    assert paired["rosa_minus_full"]["STS-B"]["mean"] == pytest.approx(2.5)  # (2 + 3) / 2
    # per-seed averages over tasks: rosa 0.65, 0.69; lora 0.665, 0.65 -> differences -1.5, +4.0
    average = paired["rosa_minus_lora"]["average"]
    assert average == bench.paired_difference([0.65, 0.69], [0.665, 0.65])
    assert average["mean"] == pytest.approx(1.25)
    assert bench.interval(average).startswith("+1.2 [") and bench.interval({"mean": -0.04, "ci95": None}) == "-0.0"


def test_report_only_rewrites_the_tables_from_glue_json_without_training(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    with pytest.raises(SystemExit, match=r"--report-only needs .*glue.json; run the benchmark with --out"):
        bench.main(["--report-only", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []

    committed = json.loads((REPO / "benchmarks" / "results" / "glue-long" / "glue.json").read_text())
    for derived in ("average", "targets", "paired"):
        committed.pop(derived, None)
    (tmp_path / "glue.json").write_text(json.dumps(committed))
    monkeypatch.setattr(bench, "run_tasks", lambda *a: pytest.fail("--report-only must not train"))
    report = bench.main(["--report-only", "--out", str(tmp_path)])
    assert report["paired"]["rosa_minus_lora"]["average"]["seeds"] == committed["seeds"]
    assert (tmp_path / "glue.md").read_text() == (REPO / "benchmarks" / "results" / "glue-long" / "glue.md").read_text()
    assert json.loads((tmp_path / "glue.json").read_text())["targets"] == report["targets"]


@pytest.mark.parametrize("folder", sorted(p.parent.relative_to(REPO / "benchmarks" / "results").as_posix()
                                          for p in (REPO / "benchmarks" / "results").glob("**/glue.json")))
def test_every_committed_table_renders_again_to_its_committed_markdown(folder, tmp_path):
    bench = load_benchmark("glue_table")
    committed = REPO / "benchmarks" / "results" / folder
    report = json.loads((committed / "glue.json").read_text())
    assert bench.write_report(report, tmp_path) == (committed / "glue.md").read_text()
    assert json.loads((tmp_path / "glue.json").read_text()) == json.loads((committed / "glue.json").read_text())


def test_report_only_with_seeds_reports_the_first_seeds_of_another_report(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    source = REPO / "benchmarks" / "results" / "glue-ablation-no-resample"
    original = (source / "glue.json").read_bytes()
    committed = json.loads(original)
    assert committed["seeds"] == 7 and committed["baseline_rosa_seeds"]
    monkeypatch.setattr(bench, "run_tasks", lambda *a: pytest.fail("--report-only must not train"))
    out = tmp_path / "first4"
    report = bench.main(["--report-only", "--from", str(source), "--seeds", "4", "--out", str(out)])

    tasks = committed["tasks"]
    def first4(method: str) -> list[float]:  # per-seed average over tasks of the first four seeds
        return [sum(t["seeds"][method][i] for t in tasks.values()) / len(tasks) for i in range(4)]
    baseline = [sum(s[i] for s in committed["baseline_rosa_seeds"].values()) / len(tasks) for i in range(4)]
    for name, other in (("rosa_minus_lora", first4("lora")), ("rosa_minus_baseline_rosa", baseline)):
        expected = bench.paired_difference(first4("rosa"), other)
        assert report["paired"][name]["average"]["seeds"] == 4
        assert report["paired"][name]["average"]["mean"] == pytest.approx(expected["mean"])
        assert report["paired"][name]["average"]["ci95"] == pytest.approx(expected["ci95"])
    assert report["seeds"] == 4 and all(len(s) == 4 for t in report["tasks"].values() for s in t["seeds"].values())
    assert report["average"]["full"] == pytest.approx(sum(sum(t["seeds"]["full"][:4]) / 4 for t in tasks.values()) / 4)
    md = (out / "glue.md").read_text()
    assert f"**The first 4 of the 7 seeds** of `{source}`" in md and "over 4 seed(s)" in md
    assert json.loads((out / "glue.json").read_text())["first_seeds_of"] == {"report": str(source), "seeds": 7}
    assert (source / "glue.json").read_bytes() == original

    # Refused, with nothing written: cutting a report in place, more seeds than it has, --from without --report-only.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "glue.json").write_bytes(original)
    with pytest.raises(SystemExit, match=r"would drop seeds from .*; write the cut report to another folder"):
        bench.main(["--report-only", "--seeds", "4", "--out", str(copy)])
    with pytest.raises(SystemExit, match=r"--seeds 8: .* has 7 seeds of every method and task; pass --seeds 7 or fewer"):
        bench.main(["--report-only", "--from", str(copy), "--seeds", "8", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="--from only goes with --report-only"):
        bench.main(["--tiny", "--from", str(copy), "--out", str(tmp_path / "none")])
    assert sorted(p.name for p in copy.iterdir()) == ["glue.json"] and (copy / "glue.json").read_bytes() == original
    assert not (tmp_path / "none").exists()


def fake_training(bench, monkeypatch, crash_after: list) -> list[tuple]:
    """Replace the model and data with stand-ins: a run's score is a known function of its method, LR, seed,
    singular-value placement, resample interval, re-warmup and selection; the run after ``crash_after[0]``
    finished ones raises ``KeyboardInterrupt``. Returns the list that collects each finished run's (method, lr, seed)."""
    monkeypatch.setattr(bench.glue, "load_tokenizer", lambda model: None)
    monkeypatch.setattr(bench.glue, "load_data", lambda settings, tokenizer: type("Data", (), {"sizes": {}})())
    monkeypatch.setattr(bench, "step_time_ab", lambda *a: {})
    trained = []

    def train_method(method, lr, settings, data, tokenizer):
        if len(trained) == crash_after[0]:
            raise KeyboardInterrupt
        trained.append((method, lr, settings.seed))
        score = {"rosa": 0.6, "lora": 0.5, "full": 0.4}[method] + lr + settings.seed / 100
        score += 0.1 * (method == "rosa" and settings.singular_values == "down")
        score -= 0.01 * (method == "rosa" and settings.resample_every is not None)
        score -= 0.02 * (method == "rosa" and settings.rewarmup_steps == 0)
        score += 0.03 * (method == "rosa" and settings.selection == "top")
        return bench.glue.MethodRun({"final_score": score, "lr": lr, "wall_seconds": 1.0, "steps": 6,
                                     "step_seconds_median": 0.1, "trainable_params": 1}, None)

    monkeypatch.setattr(bench.glue, "train_method", train_method)
    return trained


def fake_reported_training(bench, monkeypatch) -> list[tuple]:
    """:func:`fake_training` that never crashes, with data sizes for the report and no target checks."""
    trained = fake_training(bench, monkeypatch, [None])
    monkeypatch.setattr(bench, "target_checks", lambda *a: {})
    data = {"subsampled": False, "train_samples": 8, "train_total": 8, "eval_samples": 4, "eval_total": 4}
    monkeypatch.setattr(bench.glue, "load_data", lambda settings, tokenizer: type("Data", (), {"sizes": data})())
    return trained


def test_a_crash_mid_task_loses_only_the_run_in_progress(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    monkeypatch.setattr(bench, "markdown", lambda report: "")
    crash_after = [4]
    trained = fake_training(bench, monkeypatch, crash_after)
    argv = ["--tiny", "--tasks", "rte", "--seeds", "2", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):  # the fifth run of RTE's grid dies
        bench.main(argv)
    saved = tmp_path / "runs" / "RTE"
    assert sorted(p.name for p in saved.iterdir()) == sorted(f"{m}-lr{lr:g}-seed0.json" for m, lr, _ in trained)

    grid = [(m, lr, 0) for m in bench.METHODS for lr in bench.BUDGETS["tiny"].lr_grid[m]]
    seed1 = [(m, bench.BUDGETS["tiny"].lr_grid[m][-1], 1) for m in bench.METHODS]  # the larger LR scores higher
    assert trained == grid[:4]
    (saved / "lora-lr0.0015-seed0.json").write_text("{half a fil")  # an unreadable saved run is trained again
    trained.clear()
    crash_after[0] = None
    report = bench.main([*argv, "--resume"])
    assert trained == [grid[3], *grid[4:], *seed1]  # the first three saved runs were reused
    assert report["tasks"]["RTE"]["seeds"]["rosa"] == pytest.approx([0.6015, 0.6115])
    assert not (tmp_path / "runs").exists()  # RTE is in glue.json: its saved runs are gone

    trained.clear()
    crash_after[0] = 2
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    assert len(list(saved.iterdir())) == 2
    trained.clear()
    crash_after[0] = None
    bench.main(argv)  # without --resume nothing saved is reused: a fresh run trains everything
    assert trained == [*grid, *seed1]


def test_baseline_reuses_lora_and_full_and_trains_only_rosa(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    base = bench.main(["--tiny", "--tasks", "rte", "mrpc", "--seeds", "2", "--out", str(tmp_path / "base")])
    trained.clear()
    argv = ["--tiny", "--tasks", "rte", "mrpc", "--seeds", "2", "--singular-values", "down",
            "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "ablation")]
    ablation = bench.main(argv)
    rosa_grid = [("rosa", lr, 0) for lr in bench.BUDGETS["tiny"].lr_grid["rosa"]]
    rosa_seed1 = [("rosa", bench.BUDGETS["tiny"].lr_grid["rosa"][-1], 1)]
    lora_check = [("lora", bench.BUDGETS["tiny"].lr_grid["lora"][-1], 0)]  # the lent seed-0 choice, rerun first
    assert trained == 2 * [*lora_check, *rosa_grid, *rosa_seed1]  # two tasks, ROSA alone after the check
    for task, result in ablation["tasks"].items():
        assert result["baseline_reproduced"] == {"method": "lora", "lr": "0.0015", "seed": 0, "rerun_score": 0.5015,
                                                 "source_score": base["tasks"][task]["chosen"]["lora"]["final_score"]}
    for task, result in ablation["tasks"].items():
        for m in ("lora", "full"):
            assert result["runs"][m] == base["tasks"][task]["runs"][m]
            assert result["chosen"][m] == base["tasks"][task]["chosen"][m]
            assert result["seeds"][m] == base["tasks"][task]["seeds"][m]
        assert result["seeds"]["rosa"] == pytest.approx([x + 0.1 for x in base["tasks"][task]["seeds"]["rosa"]])
    paired = ablation["paired"]["rosa_minus_lora"]["average"]
    assert paired["mean"] == pytest.approx(100 * (0.7 + 0.0015 - 0.5 - 0.0015))  # both chose the larger LR
    effect = ablation["paired"]["rosa_minus_baseline_rosa"]
    assert [effect[t]["mean"] for t in ("RTE", "MRPC", "average")] == pytest.approx([10.0, 10.0, 10.0])
    md = (tmp_path / "ablation" / "glue.md").read_text()
    assert "| rosa - baseline rosa | +10.0 [+10.0, +10.0] |" in md
    assert "**ROSA ablation**: `RosaConfig.singular_values = 'down'`" in md
    assert f"reused from `{tmp_path / 'base'}` (run {base['machine']['date']})" in md
    assert ("Each task first reran that report's chosen lora run on seed 0 here and got the same score (largest "
            "difference 0).") in md
    assert "ROSA ablation" not in (tmp_path / "base" / "glue.md").read_text()
    assert "rosa_minus_baseline_rosa" not in base["paired"]

    trained.clear()
    split = [arg for arg in argv if arg not in ("--singular-values", "down")]  # same run, but the default split
    with pytest.raises(SystemExit, match="--resume: .* was run with .*'rosa_singular_values': 'down'"):
        bench.main([*split, "--resume"])
    assert trained == []


def test_a_baseline_whose_lent_run_scores_otherwise_here_is_refused_before_rosa_trains(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    bench.main(["--tiny", "--tasks", "rte", "--seeds", "2", "--out", str(tmp_path / "base")])
    path = tmp_path / "base" / "glue.json"
    report = json.loads(path.read_text())
    for run in (report["tasks"]["RTE"]["runs"]["lora"]["0.0015"], report["tasks"]["RTE"]["chosen"]["lora"]):
        run["final_score"] += 1e-3  # as if made by another torch build
    path.write_text(json.dumps(report))
    trained.clear()
    with pytest.raises(RuntimeError, match=r"RTE: the earlier report's lora run \(lr 0.0015, seed 0\) scored .* "
                                           "its runs cannot be reused"):
        bench.main(["--tiny", "--tasks", "rte", "--seeds", "2", "--selection", "block",
                    "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "block")])
    assert trained == [("lora", 1.5e-3, 0)]  # the check alone: no ROSA run was trained


def test_a_baseline_of_another_rank_lends_only_full_and_pairs_both_adapters_with_its_own(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    rank_effect = {"rosa": 0.03, "lora": -0.02}  # the stand-in's score change at rank 1
    train_method = bench.glue.train_method
    monkeypatch.setattr(bench.glue, "train_method", lambda method, lr, settings, data, tokenizer: bench.glue.MethodRun(
        {**(run := train_method(method, lr, settings, data, tokenizer).result),
         "final_score": run["final_score"] + (settings.rank == 1) * rank_effect.get(method, 0.0)}, None))
    base = bench.main(["--tiny", "--tasks", "rte", "mrpc", "--seeds", "3", "--out", str(tmp_path / "base")])
    trained.clear()
    argv = ["--tiny", "--tasks", "rte", "mrpc", "--seeds", "2", "--rank", "1",
            "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "rank1")]
    report = bench.main(argv)
    assert {m for m, _, _ in trained} == {"rosa", "lora", "full"} and len(trained) == 2 * (1 + 2 + 2 + 2)
    assert [run for run in trained if run[0] == "full"] == 2 * [("full", 1e-4, 0)]  # the lent run's check, grids, seed 1
    assert report["rank"] == 1 and report["baseline_rank"] == 8
    for task, result in report["tasks"].items():
        theirs = base["tasks"][task]
        assert (result["runs"]["full"], result["chosen"]["full"]) == (theirs["runs"]["full"], theirs["chosen"]["full"])
        assert result["seeds"]["full"] == theirs["seeds"]["full"][:2]
        for m in ("rosa", "lora"):
            assert result["seeds"][m] == pytest.approx([x + rank_effect[m] for x in theirs["seeds"][m][:2]])
            assert report[f"baseline_{m}_seeds"][task] == theirs["seeds"][m][:2]
    paired = report["paired"]
    assert list(paired) == ["rosa_minus_lora", "rosa_minus_full", "rosa_minus_baseline_rosa",
                            "lora_minus_baseline_lora", "gap_change"]
    for name, points in (("rosa_minus_baseline_rosa", 3.0), ("lora_minus_baseline_lora", -2.0), ("gap_change", 5.0)):
        assert [paired[name][t]["mean"] for t in ("RTE", "MRPC", "average")] == pytest.approx(3 * [points])
    base_gap = 100 * (0.6 - 0.5)  # both grids chose the larger LR
    assert paired["rosa_minus_lora"]["average"]["mean"] == pytest.approx(base_gap + 5.0)
    md = (tmp_path / "rank1" / "glue.md").read_text()
    assert "rank 1)" in md.splitlines()[0]
    assert "| (rosa - lora) - baseline (rosa - lora) | +5.0 [+5.0, +5.0] | +5.0 [+5.0, +5.0] | +5.0 [+5.0, +5.0] |" in md
    assert "| lora - baseline lora | -2.0 [-2.0, -2.0] |" in md
    assert "**Full fine-tuning was not trained in this run**" in md and "whose ROSA and LoRA had rank 8" in md
    assert "LoRA and full fine-tuning were not trained" not in md

    cut = bench.main(["--report-only", "--from", str(tmp_path / "rank1"), "--seeds", "1", "--out", str(tmp_path / "cut")])
    assert cut["baseline_lora_seeds"] == {t: s[:1] for t, s in report["baseline_lora_seeds"].items()}
    assert cut["paired"]["gap_change"]["average"]["mean"] == pytest.approx(5.0)


RESAMPLE_ABLATIONS = [  # option, its value, another value, a refused value and its message, report key,
    # the stand-in's effect on ROSA (x100) and what glue.md must say
    ("--resample-every", "1000", "500", "0", "--resample-every must be at least 1, got 0", "rosa_resample_every",
     -1.0, ["ROSA resampling every 1000 optimizer steps with a 1-step LR re-warmup after each resample",
            "**ROSA ablation**: resampling every 1000 optimizer steps instead of once per epoch (the chosen ROSA "
            "runs took 6 steps, so they never resampled and merged their factors once, at the end)."]),
    ("--rewarmup-steps", "0", "2", "-1", "--rewarmup-steps must be at least 0, got -1", "rosa_rewarmup_steps",
     -2.0, ["ROSA resampling once per epoch with no LR re-warmup after resamples",
            "**ROSA ablation**: with no LR re-warmup after resamples instead of the budget's 1 steps (Adam's "
            "state for the new factors is still reset)."]),
]


@pytest.mark.parametrize("option, value, other, refused, message, key, effect, sentences", RESAMPLE_ABLATIONS)
def test_a_resample_ablation_trains_rosa_alone_and_says_how_it_resampled(
        tmp_path, monkeypatch, option, value, other, refused, message, key, effect, sentences):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    base = bench.main(["--tiny", "--tasks", "rte", "--seeds", "2", "--out", str(tmp_path / "base")])
    trained.clear()
    argv = ["--tiny", "--tasks", "rte", "--seeds", "2", option, value,
            "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "ablation")]
    ablation = bench.main(argv)
    assert [run for run in trained if run[0] != "rosa"] == [("lora", 1.5e-3, 0)]  # besides ROSA, the lent run's check
    assert ablation[key] == int(value) and base[key] is None
    assert ablation["paired"]["rosa_minus_baseline_rosa"]["RTE"]["mean"] == pytest.approx(effect)
    md = (tmp_path / "ablation" / "glue.md").read_text()
    assert all(sentence in md for sentence in sentences)
    base_md = (tmp_path / "base" / "glue.md").read_text()
    assert "ROSA resampling once per epoch with a 1-step LR re-warmup after each resample" in base_md
    assert "ROSA ablation" not in base_md

    trained.clear()
    with pytest.raises(SystemExit, match=f"--resume: .* was run with .*'{key}': {value}"):
        bench.main([*(arg if arg != value else other for arg in argv), "--resume"])
    with pytest.raises(SystemExit, match=message):
        bench.main([*(arg if arg != value else refused for arg in argv)])
    assert trained == []


def test_a_selection_ablation_trains_rosa_alone_with_that_selection_and_says_so(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    base = bench.main(["--tiny", "--tasks", "rte", "--seeds", "2", "--out", str(tmp_path / "base")])
    trained.clear()
    argv = ["--tiny", "--tasks", "rte", "--seeds", "2", "--selection", "top",
            "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "top")]
    ablation = bench.main(argv)
    assert [run for run in trained if run[0] != "rosa"] == [("lora", 1.5e-3, 0)]  # besides ROSA, the lent run's check
    assert (ablation["rosa_selection"], base["rosa_selection"]) == ("top", "random")
    assert ablation["paired"]["rosa_minus_baseline_rosa"]["RTE"]["mean"] == pytest.approx(3.0)
    assert ("**ROSA ablation**: `RosaConfig.selection = 'top'`, the top 8 singular vectors of each layer train"
            in (tmp_path / "top" / "glue.md").read_text())
    assert "ROSA ablation" not in (tmp_path / "base" / "glue.md").read_text()

    trained.clear()
    with pytest.raises(SystemExit, match="--resume: .* was run with .*'rosa_selection': 'top'"):
        bench.main([*(a if a != "top" else "bottom" for a in argv), "--resume"])
    with pytest.raises(SystemExit):  # argparse: not a selection
        bench.main([*(a if a != "top" else "largest" for a in argv)])
    assert trained == []
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], bench.parse_args(argv), 3).selection == "top"
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], bench.parse_args(["--tiny"]), 3).selection == "random"


def test_the_block_selection_note_says_consecutive_vectors_from_a_random_start():
    bench = load_benchmark("glue_table")
    [note] = bench.run_variant_notes({"rank": 8, "rosa_selection": "block", "tasks": {}})
    assert note.startswith("**ROSA ablation**: `RosaConfig.selection = 'block'`, 8 consecutive singular vectors of "
                           "each layer, from a uniformly drawn start, train (as the paper authors' reference code")
    assert bench.run_variant_notes({"rank": 8, "rosa_selection": "random", "tasks": {}}) == []


def test_the_resample_note_says_never_only_when_the_interval_outlasts_the_runs():
    bench = load_benchmark("glue_table")
    report = {"rosa_resample_every": 6, "tasks": {"RTE": {"chosen": {"rosa": {"steps": 6}}}}}
    assert "so they never resampled" in bench.run_variant_notes(report)[0]
    report["rosa_resample_every"] = 4  # fewer than the runs' 6 steps: they did resample
    assert bench.run_variant_notes(report)[0].endswith("(the chosen ROSA runs took 6 steps).")


def test_the_resample_settings_reach_every_run():
    bench = load_benchmark("glue_table")
    args = bench.parse_args(["--tiny", "--resample-every", "7"])
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], args, seed=3).resample_every == 7
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], bench.parse_args(["--tiny"]), 3).resample_every is None
    args = bench.parse_args(["--tiny", "--rewarmup-steps", "0"])
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], args, seed=3).rewarmup_steps == 0
    assert bench.task_settings("RTE", bench.BUDGETS["tiny"], bench.parse_args(["--tiny"]), 3).rewarmup_steps == 1


@pytest.mark.parametrize("change, message", [
    (["--baseline", "{tmp}/nowhere"], r"nowhere/glue.json does not exist; pass the --out folder"),
    (["--seed", "1"], r"was run with .*'seed': 0.*this run is .*'seed': 1.*pass the same --budget, --model and --seed"),
    (["--tasks", "rte", "cola"], r"has no results for CoLA; leave them out of --tasks"),
    (["--seeds", "3"], r"fewer than --seeds 3 seeds: RTE 2; lower --seeds"),
])
def test_a_baseline_that_does_not_fit_is_refused_before_training(tmp_path, monkeypatch, change, message):
    bench = load_benchmark("glue_table")
    task = {"data": {}, "runs": {}, "chosen": {}, "seeds": {m: [0.5, 0.6] for m in bench.METHODS}}
    report = {"benchmark": "glue", "budget_name": "tiny", "budget": bench.asdict(bench.BUDGETS["tiny"]),
              "model": "minilm", "rank": 8, "seed": 0, "tasks": {"RTE": task}, "machine": {"date": "then"}}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "glue.json").write_text(json.dumps(report))
    monkeypatch.setattr(bench, "run_tasks", lambda *a: pytest.fail("nothing may train"))
    argv = ["--tiny", "--tasks", "rte", "--seeds", "2", "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "out")]
    argv += [arg.format(tmp=tmp_path) for arg in change]
    with pytest.raises(SystemExit, match=f"glue_table: --baseline: .*{message}"):
        bench.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid, chosen, expected", [
    (["0.001", "0.0005", "0.002"], "0.002", ["0.0005", "0.001", "0.002", "0.004"]),
    (["0.0005", "0.001", "0.002"], "0.0005", ["0.00025", "0.0005", "0.001", "0.002"]),
    (["0.0005", "0.001", "0.002"], "0.001", ["0.0005", "0.001", "0.002"]),  # an inner choice: unchanged
    (["3e-05", "0.0001"], "0.0001", ["3e-05", "0.0001", "0.00033"]),  # x 10/3, to 2 significant digits
    (["3e-05", "0.0001"], "3e-05", ["9e-06", "3e-05", "0.0001"]),
    (["0.001"], "0.001", ["0.001"]),  # no neighbour, no step to take
])
def test_widened_adds_one_lr_past_the_end_that_was_chosen(grid, chosen, expected):
    assert load_benchmark("glue_table").widened(grid, chosen) == expected


@given(st.lists(st.floats(1e-6, 1e-1), min_size=2, max_size=5, unique=True), st.booleans())
def test_widened_steps_past_the_end_as_far_as_the_end_is_from_its_neighbour(lrs, top):
    grid = sorted({f"{lr:g}" for lr in lrs}, key=float)
    if len(grid) < 2:
        return
    widened = load_benchmark("glue_table").widened(grid, grid[-1] if top else grid[0])
    assert len(widened) == len(grid) + 1 and widened == sorted(widened, key=float)
    end, neighbour, added = (grid[-1], grid[-2], widened[-1]) if top else (grid[0], grid[1], widened[0])
    assert float(added) / float(end) == pytest.approx(float(end) / float(neighbour), rel=0.051)


def test_the_grid_cell_lists_what_widen_added_task_by_task():
    grid_cell = load_benchmark("glue_table").grid_cell
    assert grid_cell([5e-4, 1e-3, 2e-3], {}) == "0.0005, 0.001, 0.002"
    assert grid_cell([5e-4, 1e-3, 2e-3], {"CoLA": ["0.004"], "MRPC": ["0.00025"], "RTE": [], "STS-B": ["0.004"]}) == (
        "0.0005, 0.001, 0.002; CoLA, STS-B +0.004; MRPC +0.00025")


def lora_peaks_at_2e_3(bench, monkeypatch) -> None:
    """Make the stand-in LoRA's score fall by 1 past an LR of 2e-3 (ROSA's and full's keep rising with the LR)."""
    train_method = bench.glue.train_method
    monkeypatch.setattr(bench.glue, "train_method", lambda method, lr, settings, data, tokenizer: bench.glue.MethodRun(
        {**(run := train_method(method, lr, settings, data, tokenizer).result),
         "final_score": run["final_score"] - (method == "lora" and lr > 2e-3)}, None))


def test_widen_adds_one_lr_past_each_chosen_end_and_reruns_seeds_only_where_the_choice_moved(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    lora_peaks_at_2e_3(bench, monkeypatch)
    base = bench.main(["--tiny", "--tasks", "rte", "mrpc", "--seeds", "3", "--out", str(tmp_path / "base")])
    common = ["--tiny", "--tasks", "rte", "mrpc", "--seeds", "3", "--rank", "1", "--baseline", str(tmp_path / "base")]
    before = bench.main([*common, "--out", str(tmp_path / "rank1")])
    trained.clear()
    argv = [*common, "--widen", str(tmp_path / "rank1"), "--out", str(tmp_path / "wide")]
    report = bench.main(argv)
    # Each task: the rerun of full's lent seed-0 run (full is reused from the rank-8 base, not widened), the rerun of
    # ROSA's chosen seed-0 run, 4.5e-3 (1.5e-3 x 1.5e-3 / 5e-4) for ROSA and LoRA, then ROSA's seeds 1 and 2 at its
    # new choice; LoRA's did not move.
    per_task = [("full", 1e-4, 0), ("rosa", 0.0015, 0), ("rosa", 0.0045, 0), ("lora", 0.0045, 0), ("rosa", 0.0045, 1),
                ("rosa", 0.0045, 2)]
    assert trained == 2 * per_task
    for task, result in report["tasks"].items():
        old = before["tasks"][task]
        assert result["widened"] == {"rosa": ["0.0045"], "lora": ["0.0045"]}
        assert list(result["runs"]["rosa"]) == ["0.0005", "0.0015", "0.0045"]
        assert result["runs"]["rosa"]["0.0015"] == old["runs"]["rosa"]["0.0015"]  # reused as it was
        assert result["chosen"]["rosa"]["lr"] == 0.0045
        assert result["seeds"]["rosa"] == pytest.approx([0.6 + 0.0045 + s / 100 for s in range(3)])
        assert (result["chosen"]["lora"], result["seeds"]["lora"]) == (old["chosen"]["lora"], old["seeds"]["lora"])
        assert result["seeds"]["full"] == base["tasks"][task]["seeds"]["full"]
        assert result["reproduced"]["rerun_score"] == result["reproduced"]["source_score"]
    assert report["widen"] == str(tmp_path / "rank1") and report["baseline_rank"] == 8
    assert report["paired"]["rosa_minus_lora"]["average"]["mean"] == pytest.approx(
        before["paired"]["rosa_minus_lora"]["average"]["mean"] + 100 * 0.003)
    md = (tmp_path / "wide" / "glue.md").read_text()
    assert f"**Grids widened** from `{tmp_path / 'rank1'}` (run {before['machine']['date']})" in md
    assert ("Added: rosa RTE 0.0045 (now chosen), rosa MRPC 0.0045 (now chosen), lora RTE 0.0045, lora MRPC 0.0045."
            in md)
    assert "| rosa | 0.0045 | 0.0045 | 0.0005, 0.0015; RTE, MRPC +0.0045 |" in md
    assert "| full | 0.0001 | 0.0001 | 3e-05, 0.0001 |" in md  # reused, not widened
    assert "Grids widened" not in (tmp_path / "rank1" / "glue.md").read_text()

    assert bench.main([*argv, "--resume"])["tasks"] == report["tasks"] and trained == 2 * per_task  # all kept


@pytest.mark.parametrize("change, message", [
    ({"--out": "{tmp}/rank1"}, "--widen: {tmp}/rank1 is also --out; write the widened report to another folder"),
    ({"--widen": "{tmp}/nowhere"}, "--widen: {tmp}/nowhere/glue.json does not exist"),
    ({"--rank": "8"}, "--widen: {tmp}/rank1/glue.json was run with .*'rank': 1.*this run is .*'rank': 8"),
    ({"--seeds": "3"}, "--widen: {tmp}/rank1/glue.json has 2 seeds; pass --seeds 2 or fewer"),
    ({"--report-only": None}, "--widen trains; it does not go with --report-only"),
])
def test_a_widen_that_does_not_fit_is_refused_before_training(tmp_path, monkeypatch, change, message):
    bench = load_benchmark("glue_table")
    trained = fake_reported_training(bench, monkeypatch)
    bench.main(["--tiny", "--tasks", "rte", "--seeds", "3", "--out", str(tmp_path / "base")])
    bench.main(["--tiny", "--tasks", "rte", "--seeds", "2", "--rank", "1", "--baseline", str(tmp_path / "base"),
                "--out", str(tmp_path / "rank1")])
    options = {"--tasks": "rte", "--seeds": "2", "--rank": "1", "--baseline": "{tmp}/base", "--widen": "{tmp}/rank1",
               "--out": "{tmp}/wide", **change}
    argv = ["--tiny"] + [arg.format(tmp=tmp_path) for k, v in options.items() for arg in (k, v) if arg is not None]
    trained.clear()
    with pytest.raises(SystemExit, match="glue_table: " + message.format(tmp=tmp_path)):
        bench.main(argv)
    assert trained == [] and not (tmp_path / "wide").exists()


def test_widen_needs_a_rerun_of_the_earlier_report_to_score_what_it_holds(tmp_path, monkeypatch):
    bench = load_benchmark("glue_table")
    monkeypatch.setattr(bench, "markdown", lambda report: "")
    crash_after = [None]
    trained = fake_training(bench, monkeypatch, crash_after)
    argv = ["--tiny", "--tasks", "rte", "--seeds", "2"]
    bench.main([*argv, "--out", str(tmp_path / "first")])
    wide = [*argv, "--widen", str(tmp_path / "first"), "--out", str(tmp_path / "wide")]
    trained.clear()
    crash_after[0] = 2  # the rerun and ROSA's widened run finish, LoRA's widened run dies
    with pytest.raises(KeyboardInterrupt):
        bench.main(wide)
    assert trained == [("rosa", 0.0015, 0), ("rosa", 0.0045, 0)]
    trained.clear()
    crash_after[0] = None
    report = bench.main([*wide, "--resume"])  # the two finished runs are reused
    assert trained[:2] == [("lora", 0.0045, 0), ("full", 0.00033, 0)]
    assert {m: r["lr"] for m, r in report["tasks"]["RTE"]["chosen"].items()} == {
        "rosa": 0.0045, "lora": 0.0045, "full": 0.00033}

    changed = json.loads((tmp_path / "first" / "glue.json").read_text())
    changed["tasks"]["RTE"]["runs"]["rosa"]["0.0015"]["final_score"] += 1e-3  # as if run with another torch build
    (tmp_path / "first" / "glue.json").write_text(json.dumps(changed))
    trained.clear()
    with pytest.raises(RuntimeError, match=r"RTE: the earlier report's rosa run \(lr 0.0015, seed 0\) scored .* "
                                           "its runs cannot be reused"):
        bench.main([*wide[:-1], str(tmp_path / "wide2")])
    assert trained == [("rosa", 0.0015, 0)]  # the rerun alone: nothing was widened
