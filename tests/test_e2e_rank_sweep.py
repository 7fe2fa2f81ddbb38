"""The E2E rank sweep on its ``--tiny`` budget (a tiny random Llama on the real E2E dev set): the protocol,
crash and resume, the report and its statistics."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")

from helpers import REPO, SHARED_DATA, load_benchmark  # noqa: E402

DEV_CSV = SHARED_DATA / "e2e" / "dev.csv"
needs_e2e = pytest.mark.skipif(not DEV_CSV.is_file(), reason=f"E2E data not found at {DEV_CSV}")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("e2e_rank_sweep")


def test_the_default_budget_is_the_documented_protocol(bench):
    budget = bench.BUDGETS["default"]
    assert budget.model == "smollm2" and budget.ranks == (1, 4, 16) and budget.seeds == 3
    assert budget.steps >= 60 and budget.batch_size == 8
    assert math.ceil(budget.steps / budget.resample_every) >= 3  # ROSA trains at least three subspaces
    assert budget.train_pairs is None and budget.test_mrs is None and budget.validation_mrs is None  # all of them
    assert bench.LR_GRID == {"rosa": (1e-3, 3e-3), "lora": (1e-3, 3e-3), "full": (1e-4, 3e-4)}
    assert len(bench.grid_runs(budget.ranks)) == 14  # 7 (method, rank) pairs x 2 LRs, then 7 x 2 more seeds


def test_mean_interval_is_the_student_t_interval(bench):
    summary = bench.mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 dof) = 4.302652729911275
    assert summary["mean"] == 2.0 and summary["std"] == pytest.approx(1.0) and summary["n"] == 3
    assert summary["ci95"] == pytest.approx([2 - 4.302652729911275 / 3**0.5, 2 + 4.302652729911275 / 3**0.5])
    assert bench.mean_interval([5.0]) == {"mean": 5.0, "std": None, "ci95": None, "n": 1}
    assert bench.interval(summary, ".1f") == "+2.0 [-0.5, +4.5]"


@needs_e2e
def test_a_crashed_sweep_resumes_from_its_finished_runs_and_checkpoint_and_reports(bench, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--tiny", "--ranks", "1", "--seeds", "2", "--data", str(DEV_CSV), "--out", str(out)]
    steps_per_run, every = bench.BUDGETS["tiny"].steps, bench.BUDGETS["tiny"].resample_every
    real_step, real_run = bench.e2e.optimizer_step, bench.run_one
    steps, started, crash_at = [], [], [2 * steps_per_run + every + 1]

    def crash_on_the_third_runs_third_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == crash_at[0]:
            crash_at[0] = None
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(bench.e2e, "optimizer_step", crash_on_the_third_runs_third_step)
    monkeypatch.setattr(bench, "run_one", lambda spec, *a: started.append(spec.key) or real_run(spec, *a))
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    crashed = started[-1]
    assert len(list((out / bench.FINISHED).iterdir())) == 2 and (out / bench.WORK / crashed).is_dir()
    with pytest.raises(SystemExit, match="pass --resume"):
        bench.main(argv)

    steps.clear(), started.clear()
    report = bench.main([*argv, "--resume"])
    assert len(started) == 7 and crashed in started  # the two finished runs were not trained again
    assert len(steps) == (steps_per_run - every) + 6 * steps_per_run  # the crashed run went on from its checkpoint
    assert not (out / bench.WORK).exists()

    # the crashed run, continued, trained as one never interrupted
    spec = bench.RunSpec(**report["runs"][crashed]["spec"])
    model = str(bench.e2e.write_tiny_e2e_model(tmp_path / "model", DEV_CSV))
    alone = real_run(spec, bench.BUDGETS["tiny"], model, DEV_CSV, tmp_path / "alone", False)
    assert report["runs"][crashed]["result"]["train_loss_curve"] == alone["train_loss_curve"]
    assert report["runs"][crashed]["result"]["scores"] == alone["scores"]

    saved = json.loads((out / f"{bench.STEM}.json").read_text())
    assert saved["planned_runs"] == len(saved["runs"]) == 9
    methods = saved["summary"]["methods"]
    assert list(methods) == ["rosa r1", "lora r1", "full"] and all(m["seeds"] == [0, 1] for m in methods.values())
    for name, m in methods.items():  # the chosen LR is the grid's best on validation BLEU, seed 0
        grid = {lr: saved["runs"][bench.RunSpec(m["method"], m["rank"], lr, 0).key]["result"]["scores"]["validation"]
                for lr in bench.LR_GRID[m["method"]]}
        assert m["lr"] == max(grid, key=lambda lr: grid[lr]["bleu"])
    assert methods["lora r1"]["update_rank"]["numerical_rank_max"] == 1
    assert 1 < methods["rosa r1"]["update_rank"]["numerical_rank_max"] <= 6  # 3 subspaces, 2 directions each
    assert methods["full"]["update_rank"]["numerical_rank_max"] > 6
    assert methods["rosa r1"]["trainable_params"] == methods["lora r1"]["trainable_params"]
    paired = saved["summary"]["rosa_minus_lora"]["1"]["bleu"]
    rosa = [saved["runs"][bench.RunSpec("rosa", 1, methods["rosa r1"]["lr"], s).key] for s in (0, 1)]
    lora = [saved["runs"][bench.RunSpec("lora", 1, methods["lora r1"]["lr"], s).key] for s in (0, 1)]
    differences = [r["result"]["scores"]["test"]["bleu"] - q["result"]["scores"]["test"]["bleu"]
                   for r, q in zip(rosa, lora)]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(sum(differences) / 2)

    md = (out / f"{bench.STEM}.md").read_text()
    for text in ("| method | LR | seeds | BLEU | NIST | METEOR | ROUGE-L | CIDEr |", "## ROSA - LoRA, paired by seed",
                 "| rosa r1 |", "| lora r1 |", "| full |", "tiny random Llama", f"![BLEU and ROUGE-L against rank]"):
        assert text in md
    assert "Incomplete" not in md and (out / f"{bench.STEM}.png").stat().st_size > 0
    (out / f"{bench.STEM}.md").unlink()
    bench.main(["--report-only", "--out", str(out)])
    assert (out / f"{bench.STEM}.md").read_text() == md

    # a saved run made with other settings is trained again, the others are reused
    path = out / bench.FINISHED / f"{crashed}.json"
    tampered = json.loads(path.read_text())
    tampered["settings"]["budget"]["steps"] += 1
    path.write_text(json.dumps(tampered))
    started.clear()
    bench.main([*argv, "--resume"])
    assert started == [crashed]


def test_bad_options_are_refused_before_anything_runs(bench, tmp_path):
    for bad in (["--seeds", "0"], ["--workers", "0"], ["--ranks", "0"]):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", *bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["--tiny", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_e2e
def test_two_workers_run_the_grid_then_the_seeds(tmp_path):
    """The script as users run it, in two worker processes."""
    command = [sys.executable, str(REPO / "benchmarks" / "e2e_rank_sweep.py"), "--tiny", "--ranks", "1",
               "--seeds", "2", "--workers", "2", "--data", str(DEV_CSV), "--out", str(tmp_path)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    saved = json.loads((tmp_path / "e2e-rank-sweep.json").read_text())
    assert saved["workers"] == 2 and len(saved["runs"]) == saved["planned_runs"] == 9
    assert all(m["seeds"] == [0, 1] for m in saved["summary"]["methods"].values())
