"""benchmarks.glue_update_geometry and the per-epoch ``observe`` hook of ``rosa glue``'s training, on tiny real runs."""

import json
from dataclasses import replace

import pytest

import rosa
from helpers import GLUE_DIR, REPO, load_benchmark, needs_glue
from rosa.experiments import glue


@needs_glue
def test_observe_sees_the_model_before_training_and_after_each_epochs_resample():
    bench = load_benchmark("glue_table")
    settings = replace(bench.task_settings("RTE", bench.BUDGETS["tiny"], bench.parse_args(["--data-dir", str(GLUE_DIR)]), 0),
                       epochs=2, methods=["rosa"])
    tokenizer = glue.load_tokenizer(settings.model)
    seen = []

    def observe(model, epoch):
        layer = next(iter(rosa.rosa_layers(model).values()))
        seen.append((epoch, layer.resample_count, layer.up.detach().clone()))

    glue.train_method("rosa", 1e-3, settings, glue.load_data(settings, tokenizer), tokenizer, observe=observe)
    assert [(epoch, count) for epoch, count, _ in seen] == [(0, 0), (1, 1), (2, 1)]  # no resample after the last step
    assert not seen[0][2].equal(seen[1][2])


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Tiny one-seed ``glue_table.py`` reports on RTE: random selection (every method) and top selection."""
    table = load_benchmark("glue_table")
    random_dir, top_dir = tmp_path_factory.mktemp("random"), tmp_path_factory.mktemp("top")
    common = ["--tiny", "--tasks", "rte", "--seeds", "1", "--data-dir", str(GLUE_DIR)]
    table.main([*common, "--out", str(random_dir)])
    table.main([*common, "--selection", "top", "--baseline", str(random_dir), "--out", str(top_dir)])
    return random_dir, top_dir


@needs_glue
def test_each_method_reruns_its_reports_seed0_choice_exactly_and_its_update_fits_its_rank(reports, tmp_path):
    random_dir, top_dir = reports
    geometry = load_benchmark("glue_update_geometry")
    report = geometry.main(["--from", str(random_dir), "--top-from", str(top_dir), "--tasks", "rte",
                            "--data-dir", str(GLUE_DIR), "--out", str(tmp_path)])
    variants = report["tasks"]["RTE"]["variants"]
    random_table, top_table = (json.loads((d / "glue.json").read_text())["tasks"]["RTE"] for d in reports)
    assert variants["rosa-top"]["lr"] == top_table["chosen"]["rosa"]["lr"]
    assert variants["lora"]["lr"] == random_table["chosen"]["lora"]["lr"]
    assert all(v["reproduced"] for v in variants.values())
    assert variants["lora"]["energy_rank_max"] <= 8  # rank-8 LoRA
    assert variants["rosa"]["energy_rank_max"] <= 16  # one rank-8 subspace with both factors trained
    assert variants["full"]["energy_rank_max"] > 16
    assert all(v["overlaps"] == [] for v in variants.values())  # one epoch: no resample
    text = (tmp_path / "geometry.md").read_text()
    assert "No resample in this budget" in text and "| RTE | rosa-top |" in text


@needs_glue
def test_tiny_run_measures_one_resample_of_each_rosa_variant(tmp_path):
    report = load_benchmark("glue_update_geometry").main(["--tiny", "--tasks", "rte", "--data-dir", str(GLUE_DIR),
                                                          "--out", str(tmp_path)])
    variants = report["tasks"]["RTE"]["variants"]
    assert [len(variants[v]["overlaps"]) for v in ("rosa", "rosa-top", "lora", "full")] == [1, 1, 0, 0]
    assert all(0.0 <= o <= 1.0 + 1e-9 for v in variants.values() for o in v["overlaps"])
    assert variants["rosa"]["energy_rank_max"] <= 32  # two rank-8 subspaces
    assert "Pre-registered reading" in (tmp_path / "geometry.md").read_text()


@needs_glue
@pytest.mark.parametrize("swap, message", [(True, "--from .* must be a random-selection"),
                                            (False, "cannot read --top-from")])
def test_reports_of_the_wrong_kind_are_refused_before_anything_is_written(reports, tmp_path, swap, message):
    random_dir, top_dir = reports
    sources = (top_dir, random_dir) if swap else (random_dir, tmp_path / "missing")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        load_benchmark("glue_update_geometry").main(["--from", str(sources[0]), "--top-from", str(sources[1]),
                                                     "--out", str(out)])
    assert not out.exists()


def test_the_committed_report_renders_again_to_its_committed_markdown():
    committed = REPO / "benchmarks" / "results" / "glue-update-geometry"
    report = json.loads((committed / "geometry.json").read_text())
    assert load_benchmark("glue_update_geometry").markdown(report) == (committed / "geometry.md").read_text()
