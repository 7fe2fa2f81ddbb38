"""The held-out learning-rate check of the GLUE table (``benchmarks.glue_heldout``)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ROSA_NO_PROGRESS"] = "1"

import json
import statistics
from pathlib import Path

import pytest

pytest.importorskip("peft")

from helpers import GLUE_DIR, REPO, load_benchmark, needs_glue  # noqa: E402


def test_source_scores_hold_the_grid_on_the_first_seed_and_the_chosen_lr_on_every_seed():
    heldout = load_benchmark("glue_heldout")
    result = {"runs": {"rosa": {"0.001": {"final_score": 0.5}, "0.002": {"final_score": 0.7}}},
              "chosen": {"rosa": {"lr": 0.002}}, "seeds": {"rosa": [0.7, 0.6, 0.4]}}
    assert heldout.source_scores(result, first_seed=10) == {
        "rosa": {"0.001": {"10": 0.5}, "0.002": {"10": 0.7, "11": 0.6, "12": 0.4}}}


@pytest.mark.parametrize("variant, expected", [
    ({}, ("split", None, 1, "random")),  # a source from before the variant keys: the defaults, the budget's re-warmup
    ({"rosa_singular_values": "down", "rosa_resample_every": 7, "rosa_rewarmup_steps": 0, "rosa_selection": "top"},
     ("down", 7, 0, "top")),
])
def test_runs_repeat_the_sources_rosa_variant(variant, expected, tmp_path):
    heldout, bench = load_benchmark("glue_heldout"), load_benchmark("glue_table")
    args = heldout.parse_args(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    source = {"model": "minilm", "rank": 8, **variant}
    settings = bench.task_settings("RTE", bench.BUDGETS["tiny"], heldout.run_arguments(args, source), seed=4)
    assert (settings.singular_values, settings.resample_every, settings.rewarmup_steps, settings.selection) == expected
    assert (settings.model, settings.rank, settings.seed) == ("minilm", 8, 4)


def test_merged_keeps_every_run_and_the_later_score_of_a_repeated_one():
    heldout = load_benchmark("glue_heldout")
    first = {"rosa": {"0.001": {"0": 0.5, "1": 0.6}}}
    later = {"rosa": {"0.001": {"1": 0.7}, "0.002": {"0": 0.4}}, "full": {"3e-05": {"0": 0.1}}}
    assert heldout.merged(first, later) == {"rosa": {"0.001": {"0": 0.5, "1": 0.7}, "0.002": {"0": 0.4}},
                                            "full": {"3e-05": {"0": 0.1}}}
    assert first == {"rosa": {"0.001": {"0": 0.5, "1": 0.6}}}  # the inputs are left as they were


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


@pytest.fixture(scope="module")
def checked(source, tmp_path_factory):
    """The held-out check of ``source`` (seeds 0 and 1 choose, seed 2 scores): folder and report."""
    out = tmp_path_factory.mktemp("heldout") / "checked"
    return out, load_benchmark("glue_heldout").main(heldout_args(source[0], out))


@pytest.mark.real_model
@needs_glue
def test_each_lr_is_chosen_on_the_selection_seeds_and_scored_on_the_held_out_ones(source, checked, monkeypatch):
    source_dir, source_report = source
    tmp_path, report = checked
    heldout = load_benchmark("glue_heldout")
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
    ("widened", "widened the grids of .*/wider \\(glue_table.py --widen\\), so its grids differ by task"),
])
def test_a_source_that_cannot_be_checked_is_refused_before_anything_is_written(tmp_path, monkeypatch, change, message):
    heldout = load_benchmark("glue_heldout")
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("trained"))
    budget = json.loads(json.dumps(heldout.glue_table.asdict(heldout.BUDGETS["tiny"])))
    report = {"complete": change != "partial", "budget_name": "tiny", "seeds": 3,
              "budget": {**budget, "epochs": 2} if change == "budget" else budget,
              "widen": str(tmp_path / "wider") if change == "widened" else None}
    source = tmp_path / "source"
    if change != "missing":
        source.mkdir()
        (source / "glue.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=message):
        heldout.main(heldout_args(source, tmp_path / "out", select_seeds=3 if change == "seeds" else 2))
    assert not (tmp_path / "out").exists()


# The LR that --widen adds past each end of the tiny budget's two-LR grids (written out by hand).
TINY_ADDED = {"rosa": {"0.0005": "0.00017", "0.0015": "0.0045"}, "lora": {"0.0005": "0.00017", "0.0015": "0.0045"},
              "full": {"3e-05": "9e-06", "0.0001": "0.00033"}}


@pytest.mark.real_model
@needs_glue
def test_widen_adds_an_lr_past_the_chosen_end_reuses_every_run_and_chooses_again(source, checked, tmp_path,
                                                                                   monkeypatch):
    (source_dir, _), (checked_dir, before) = source, checked
    heldout = load_benchmark("glue_heldout")
    report = heldout.main(heldout_args(source_dir, tmp_path) + ["--widen", str(checked_dir)])
    assert report["complete"] and report["widen_dir"] == str(checked_dir)
    task, previous = report["tasks"]["RTE"], before["tasks"]["RTE"]
    expected_runs = 0
    for method, lrs in heldout.BUDGETS["tiny"].lr_grid.items():
        added = TINY_ADDED[method][previous["chosen_lr"][method]]  # a two-LR grid's choice is always an end
        assert task["grid"][method] == sorted([f"{lr:g}" for lr in lrs] + [added], key=float)
        scores = task["scores"][method]
        for lr, by_seed in previous["scores"][method].items():  # every earlier run is kept as it was
            assert {s: scores[lr][s] for s in by_seed} == by_seed
        assert set(scores[added]) >= {"0", "1"}
        means = {lr: statistics.fmean([scores[lr]["0"], scores[lr]["1"]]) for lr in task["grid"][method]}
        assert task["chosen_lr"][method] == max(task["grid"][method], key=means.__getitem__)
        assert task["seeds"][method] == [scores[task["chosen_lr"][method]]["2"]]
        expected_runs += 2 + (task["chosen_lr"][method] == added)  # the added LR on seeds 0, 1 (and 2 if chosen)
    assert task["trained_runs"] == expected_runs
    md = (tmp_path / "heldout.md").read_text()
    assert f"the grids widened from the check in `{checked_dir}`" in md
    assert "Learning rates added, each past the end of its grid that the earlier check chose: rosa on RTE " in md

    # Run again: the finished task is kept, nothing is trained.
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("a finished task was trained again"))
    widen_again = heldout_args(source_dir, tmp_path) + ["--widen", str(checked_dir)]
    assert heldout.main(widen_again)["tasks"] == report["tasks"]


@pytest.mark.real_model
@needs_glue
@pytest.mark.parametrize("change, message", [
    ("missing", "does not exist"),
    ("same", "is also --out"),
    ("partial", "is a partial run"),
    ("seeds", r"checked another source table or seeds \(select_seeds, held_out_seeds differ\)"),
])
def test_a_check_that_cannot_be_widened_is_refused_before_anything_is_written(source, checked, tmp_path, monkeypatch,
                                                                              change, message):
    heldout = load_benchmark("glue_heldout")
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("trained"))
    previous = tmp_path / "previous"
    if change != "missing":
        report = json.loads((checked[0] / "heldout.json").read_text())
        report["complete"] = change != "partial"
        if change == "seeds":
            report["select_seeds"], report["held_out_seeds"] = [0], [1, 2]
        previous.mkdir()
        (previous / "heldout.json").write_text(json.dumps(report))
    out = previous if change == "same" else tmp_path / "out"
    kept = (previous / "heldout.json").read_text() if change != "missing" else None
    with pytest.raises(SystemExit, match=message):
        heldout.main(heldout_args(source[0], out) + ["--widen", str(previous)])
    assert not (tmp_path / "out").exists()
    assert change == "missing" or (previous / "heldout.json").read_text() == kept


@pytest.fixture(scope="module")
def ablation(source, tmp_path_factory):
    """A tiny ROSA ablation of ``source`` (never resamples; LoRA and full reused from it): folder and report."""
    out = tmp_path_factory.mktemp("heldout") / "ablation"
    report = load_benchmark("glue_table").main(["--tiny", "--tasks", "rte", "--seeds", "3", "--resample-every", "1000000",
                                                "--baseline", str(source[0]), "--data-dir", str(GLUE_DIR),
                                                "--out", str(out)])
    return out, report


@pytest.mark.real_model
@needs_glue
def test_baseline_chooses_only_rosa_and_takes_lora_and_full_from_the_check_of_the_reused_table(
        checked, ablation, tmp_path, monkeypatch):
    (checked_dir, before), (ablation_dir, ablated) = checked, ablation
    heldout = load_benchmark("glue_heldout")
    trained, train = [], heldout.glue_table.train
    monkeypatch.setattr(heldout.glue_table, "train", lambda method, *a: trained.append(method) or train(method, *a))
    report = heldout.main(heldout_args(ablation_dir, tmp_path) + ["--baseline", str(checked_dir)])
    assert report["complete"] and report["baseline_dir"] == str(checked_dir)
    assert trained.count("lora") == 1 and set(trained) == {"rosa", "lora"}  # besides ROSA, the lent run's check
    task, previous, given = report["tasks"]["RTE"], before["tasks"]["RTE"], ablated["tasks"]["RTE"]
    lent_lr = previous["chosen_lr"]["lora"]
    assert task["baseline_reproduced"] == {"method": "lora", "lr": lent_lr, "seed": 0,
                                           "source_score": previous["scores"]["lora"][lent_lr]["0"],
                                           "rerun_score": previous["scores"]["lora"][lent_lr]["0"]}
    for method in ("lora", "full"):  # taken as the baseline check had them
        assert all(task[k][method] == previous[k][method] for k in ("chosen_lr", "selection_means", "seeds", "scores"))
    lrs = [f"{lr:g}" for lr in heldout.BUDGETS["tiny"].lr_grid["rosa"]]
    scores, source_lr = task["scores"]["rosa"], f"{given['chosen']['rosa']['lr']:g}"
    assert [scores[source_lr][str(s)] for s in range(3)] == given["seeds"]["rosa"]  # the ablation's runs, reused
    means = [statistics.fmean([scores[lr]["0"], scores[lr]["1"]]) for lr in lrs]
    assert task["chosen_lr"]["rosa"] == lrs[means.index(max(means))]
    assert task["seeds"]["rosa"] == [scores[task["chosen_lr"]["rosa"]]["2"]]
    # Besides the lent run's check: the reproduction rerun, the other LR on seed 1, and seed 2 of a new choice.
    assert len(trained) - 1 == 1 + task["trained_runs"] == 1 + len(lrs) - 1 + (task["chosen_lr"]["rosa"] != source_lr)
    assert report["paired"]["rosa_minus_baseline_rosa"]["RTE"]["mean"] == pytest.approx(
        100 * (task["seeds"]["rosa"][0] - previous["seeds"]["rosa"][0]))
    md = (tmp_path / "heldout.md").read_text()
    assert "**ROSA ablation** (as the source ran it): singular values `split`, resampling every 1000000" in md
    assert f"are those of the check in `{checked_dir}`" in md and "| rosa - baseline rosa |" in md
    assert "Each task first reran that check's chosen lora run on seed 0 here and got the same score" in md


@pytest.mark.real_model
@needs_glue
def test_a_baseline_check_whose_lent_run_scores_otherwise_here_is_refused_before_rosa_trains(
        checked, ablation, tmp_path, monkeypatch):
    (checked_dir, _), (ablation_dir, _) = checked, ablation
    check, source = (json.loads((d / name).read_text()) for d, name in ((checked_dir, "heldout.json"),
                                                                        (ablation_dir, "glue.json")))
    # As if the table both reused had been made on another torch build: its LoRA run scores 1e-3 more than here.
    lr, lent = check["tasks"]["RTE"]["chosen_lr"]["lora"], source["tasks"]["RTE"]
    check["tasks"]["RTE"]["scores"]["lora"][lr]["0"] += 1e-3
    lent["runs"]["lora"][lr]["final_score"] += 1e-3
    if f"{lent['chosen']['lora']['lr']:g}" == lr:
        lent["seeds"]["lora"][0] += 1e-3
    for name, data, directory in (("heldout.json", check, "check"), ("glue.json", source, "source")):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / name).write_text(json.dumps(data))
    heldout = load_benchmark("glue_heldout")
    trained, train = [], heldout.glue_table.train
    monkeypatch.setattr(heldout.glue_table, "train", lambda method, *a: trained.append(method) or train(method, *a))
    with pytest.raises(RuntimeError, match=rf"RTE: the earlier report's lora run \(lr {lr}, seed 0\) scored .* "
                                           "its runs cannot be reused"):
        heldout.main(heldout_args(tmp_path / "source", tmp_path / "out") + ["--baseline", str(tmp_path / "check")])
    assert trained == ["rosa", "lora"]  # the source's reproduction rerun and the lent run's check: nothing else


def rank1_source(source_dir: Path, out: Path) -> dict:
    """A tiny ``glue_table.py --rank 1`` run (full fine-tuning reused from ``source_dir``) in ``out``; its report."""
    return load_benchmark("glue_table").main(["--tiny", "--tasks", "rte", "--seeds", "3", "--rank", "1", "--baseline",
                                              str(source_dir), "--data-dir", str(GLUE_DIR), "--out", str(out)])


@pytest.mark.real_model
@needs_glue
def test_a_baseline_check_of_another_rank_lends_only_full_and_pairs_both_adapters_with_its_own(
        source, checked, tmp_path, monkeypatch):
    checked_dir, before = checked
    rank1 = rank1_source(source[0], tmp_path / "rank1")
    heldout = load_benchmark("glue_heldout")
    trained, train = [], heldout.glue_table.train
    monkeypatch.setattr(heldout.glue_table, "train", lambda method, *a: trained.append(method) or train(method, *a))
    report = heldout.main(heldout_args(tmp_path / "rank1", tmp_path / "out") + ["--baseline", str(checked_dir)])
    assert report["complete"] and report["baseline_rank"] == 8 and set(trained) == {"rosa", "lora", "full"}
    assert trained.count("full") == 1 and report["tasks"]["RTE"]["baseline_reproduced"]["method"] == "full"
    task, previous, given = report["tasks"]["RTE"], before["tasks"]["RTE"], rank1["tasks"]["RTE"]
    assert all(task[k]["full"] == previous[k]["full"] for k in ("chosen_lr", "selection_means", "seeds", "scores"))
    for method in ("rosa", "lora"):  # chosen here over this source's rank-1 runs
        scores = task["scores"][method]
        assert scores[f"{given['chosen'][method]['lr']:g}"]["0"] == given["chosen"][method]["final_score"]
        means = {lr: statistics.fmean([scores[lr]["0"], scores[lr]["1"]]) for lr in task["selection_means"][method]}
        assert task["chosen_lr"][method] == max(means, key=means.get)
        assert report[f"baseline_{method}_seeds"] == {"RTE": previous["seeds"][method]}
    gap = report["paired"]["gap_change"]["RTE"]["mean"]
    assert gap == pytest.approx(100 * (task["seeds"]["rosa"][0] - task["seeds"]["lora"][0]
                                       - previous["seeds"]["rosa"][0] + previous["seeds"]["lora"][0]))
    md = (tmp_path / "out" / "heldout.md").read_text()
    assert "**Full fine-tuning was not chosen or trained in this check**" in md and "had rank 8)" in md
    assert "| (rosa - lora) - baseline (rosa - lora) |" in md and "| lora - baseline lora |" in md


@pytest.mark.real_model
@needs_glue
@pytest.mark.parametrize("change, message", [
    ("not an ablation", "--source trained its own LoRA and full runs"),
    ("missing", "does not exist"),
    ("seeds", r"checked another budget, rank or seeds \(select_seeds, held_out_seeds differ\)"),
    ("rank", r"checked another budget, rank or seeds \(rank differ\)"),  # e.g. a glue_table --rank 1 source
    ("other runs", "scored lora on RTE at lr .* not the runs the source reused"),
])
def test_a_baseline_check_that_does_not_fit_is_refused_before_anything_is_written(source, checked, ablation, tmp_path,
                                                                                  monkeypatch, change, message):
    heldout = load_benchmark("glue_heldout")
    monkeypatch.setattr(heldout.glue_table, "train", lambda *a: pytest.fail("trained"))
    report = json.loads((checked[0] / "heldout.json").read_text())
    if change == "seeds":
        report["select_seeds"], report["held_out_seeds"] = [0], [1, 2]
    if change == "rank":
        report["source"]["rank"] += 1
    if change == "other runs":
        lora = report["tasks"]["RTE"]["scores"]["lora"]
        lora[next(iter(lora))]["0"] += 0.01
    previous = tmp_path / "previous"
    if change != "missing":
        previous.mkdir()
        (previous / "heldout.json").write_text(json.dumps(report))
    args = heldout_args(source[0] if change == "not an ablation" else ablation[0], tmp_path / "out")
    args += ["--baseline", str(previous)]
    with pytest.raises(SystemExit, match=message):
        heldout.main(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
@needs_glue
def test_widen_with_baseline_widens_the_chosen_adapters_and_still_takes_full_from_the_baseline_check(
        source, checked, tmp_path, monkeypatch):
    (checked_dir, before), heldout = checked, load_benchmark("glue_heldout")
    rank1_source(source[0], tmp_path / "rank1")
    lend = ["--baseline", str(checked_dir)]
    first = heldout.main(heldout_args(tmp_path / "rank1", tmp_path / "first") + lend)
    trained, train = [], heldout.glue_table.train
    monkeypatch.setattr(heldout.glue_table, "train", lambda method, *a: trained.append(method) or train(method, *a))
    report = heldout.main(heldout_args(tmp_path / "rank1", tmp_path / "wide") + lend + ["--widen", str(tmp_path / "first")])
    assert report["complete"] and set(trained) == {"rosa", "lora", "full"} and trained.count("full") == 1
    task, previous, lent = report["tasks"]["RTE"], first["tasks"]["RTE"], before["tasks"]["RTE"]
    grid = [f"{lr:g}" for lr in heldout.BUDGETS["tiny"].lr_grid["full"]]
    assert task["grid"]["full"] == grid and all(task[k]["full"] == lent[k]["full"] for k in heldout.LENT_KEYS)
    for method in ("rosa", "lora"):
        added = TINY_ADDED[method][previous["chosen_lr"][method]]
        assert added in task["grid"][method] and set(task["scores"][method][added]) >= {"0", "1"}
        means = {lr: statistics.fmean([task["scores"][method][lr][s] for s in ("0", "1")]) for lr in task["grid"][method]}
        assert task["chosen_lr"][method] == max(task["grid"][method], key=means.__getitem__)
    assert report["baseline_rosa_seeds"] == first["baseline_rosa_seeds"] and "gap_change" in report["paired"]
    md = (tmp_path / "wide" / "heldout.md").read_text()
    assert "reused from the source and that check and the `--baseline` check after" in md
    assert f"the grids widened from the check in `{tmp_path / 'first'}`" in md and "had rank 8)" in md

    with pytest.raises(SystemExit, match="--widen: .* was run with --baseline .*, this run with --baseline None"):
        heldout.main(heldout_args(tmp_path / "rank1", tmp_path / "other") + ["--widen", str(tmp_path / "first")])
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (REPO / "benchmarks" / "results").glob("*/heldout.json")))
def test_every_committed_check_renders_again_to_its_committed_markdown(name, tmp_path):
    heldout = load_benchmark("glue_heldout")
    committed = REPO / "benchmarks" / "results" / name
    report = json.loads((committed / "heldout.json").read_text())  # the oldest predate rosa_variant and grid
    assert heldout.write_report(report, tmp_path) == (committed / "heldout.md").read_text()
    assert json.loads((tmp_path / "heldout.json").read_text()) == json.loads((committed / "heldout.json").read_text())


def test_the_variant_note_names_a_non_default_selection_and_reads_older_checks_as_defaults():
    heldout = load_benchmark("glue_heldout")
    budget = {"rewarmup_steps": 20}
    older = {"source": {"budget": budget}, "rosa_variant": {"rosa_singular_values": "split",
                                                           "rosa_resample_every": None, "rosa_rewarmup_steps": None}}
    assert heldout.variant_note(older) == []  # a check from before rosa_selection ran the default ROSA
    top = {**older, "rosa_variant": {**older["rosa_variant"], "rosa_selection": "top"}}
    assert heldout.variant_note(top)[1] == (
        "**ROSA ablation** (as the source ran it): singular values `split`, selection `top`, resampling once per "
        "epoch, with a 20-step LR re-warmup after each resample.")
