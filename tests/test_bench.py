"""``rosa bench`` on tiny random models: every code path runs in CI, and its bookkeeping is right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosa.cli import main
from rosa.experiments import bench


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["bench", "--tiny", "--no-rss", "--threads", "1", "--out", str(out), "--note", "CI smoke run"])
    return out, json.loads((out / "perf.json").read_text())


def test_tiny_bench_writes_json_and_markdown(tiny_result):
    out, result = tiny_result
    assert set(result["models"]) == {"tiny-bert", "tiny-llama"}
    report = (out / "perf.md").read_text()
    assert "## Targets" in report and "CI smoke run" in report and "Produced " in report and "noise floor" in report
    for name, r in result["models"].items():
        assert r["kind"] == bench.parse_model(name)[1]
        assert set(r["step_time_s"]) == {"rosa", "lora", "full"}
        assert all(len(times) == 2 for times in r["step_times_s"].values())
        assert set(r["latency_s"]) == {"original", "original_copy", "merged_rosa", "lora_unmerged", "lora_merged"}
        assert r["resample"]["layers"] > 0 and r["resample"]["seconds"] > 0
        assert r["epoch"]["resample_fraction"] == pytest.approx(r["resample"]["seconds"] / r["epoch"]["seconds"])
        assert "peak_rss_bytes" not in r


def test_tiny_bench_counts_bytes_exactly(tiny_result):
    for r in tiny_result[1]["models"].values():
        rosa_, lora, full = (r["bytes_after_step"][m] for m in ("rosa", "lora", "full"))
        # same targets and rank: ROSA's factors are exactly as large as LoRA's A and B
        assert rosa_["trainable"] == lora["trainable"] == rosa_["gradients"] == lora["gradients"]
        assert full["trainable"] == full["parameters"] == full["gradients"]
        # AdamW: two moments per trainable element, plus one 4-byte step counter per tensor
        for c in (rosa_, lora, full):
            assert 2 * c["trainable"] <= c["optimizer_state"] < 2 * c["trainable"] + 4 * 100
        assert r["peak_training_bytes"]["rosa"] < r["peak_training_bytes"]["full"]


def test_tiny_bench_evaluates_every_applicable_target(tiny_result):
    rows = tiny_result[1]["targets"]
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row["target"])
        assert row["met"] in ("met", "NOT met")
    assert len(by_model["tiny-bert"]) == 4  # step time, peak, latency, resample/epoch (no RSS: --no-rss)
    assert len(by_model["tiny-llama"]) == 5  # + ROSA/full peak for causal LMs


def test_targets_are_marked_honestly():
    result = {"kind": "lm", "ratios": {
        "step_time_rosa_over_lora": 1.06, "peak_rosa_over_lora": 1.0, "peak_rosa_over_full": 0.4,
        "latency_merged_rosa_over_original": 0.96, "resample_over_epoch": 0.005,
    }}
    marks = {row["target"]: row["met"] for row in bench.evaluate_targets({"m": result})}
    assert marks == {
        "ROSA/LoRA train step time": "NOT met",
        "ROSA/LoRA peak training memory (tensors)": "met",
        "ROSA/full peak training memory, AdamW (tensors)": "met",
        "merged ROSA/original inference latency": "NOT met",
        "one resample / one epoch (E2E-sized)": "met",
    }


def test_peak_rss_is_measured_in_one_child_process_per_method():
    rss = bench.child_rss("tiny-bert", "cls", bench.BenchSettings.tiny(threads=1))
    assert set(rss) == {"rosa", "lora", "full"}
    assert all(0 < r["after_load"] <= r["peak"] for r in rss.values())


def test_allocation_trace_sees_net_and_peak_bytes():
    kept = []
    trace = bench.allocation_trace(lambda: kept.append(torch.ones(1000) + torch.ones(1000)))
    assert trace.net == 4000  # the kept sum; the two temporaries were freed
    assert trace.peak >= 3 * 4000 - 4000  # at least two tensors of 4000 bytes alive at once


def test_a_free_recorded_after_its_address_is_reused_is_counted_at_the_reuse():
    # A at 1 (100 bytes), freed, reallocated at 1 before that free is recorded, then both frees
    assert bench.peak_bytes([(100, 1), (100, 1), (-100, 1), (-100, 1)]) == 100
    assert bench.peak_bytes([(100, 1), (50, 2), (-100, 1), (-50, 2)]) == 150  # distinct addresses: both live
    assert bench.peak_bytes([(-30, 3), (100, 1)]) == 70  # a block from before the trace freed


def test_model_specs_and_settings_are_validated():
    assert bench.parse_model("minilm") == ("minilm", "cls")
    assert bench.parse_model("some/folder:lm") == ("some/folder", "lm")
    assert bench.parse_model("tiny-llama") == ("tiny-llama", "lm")
    with pytest.raises(SystemExit):
        main(["bench", "--svd", "approximate"])
    with pytest.raises(ValueError, match="--warmup"):
        main(["bench", "--tiny", "--warmup", "0"])


@pytest.mark.parametrize("name, kind, parameters", [
    ("roberta-125m", "cls", 124_647_170),  # roberta-base's 124,645,632 with a 2-label head instead of the pooler
    ("gpt2-124m", "lm", 124_439_808),  # gpt2
    ("llama-1b", "lm", 1_235_814_400),  # Llama-3.2-1B
])
def test_random_models_have_the_shapes_they_are_named_after(name, kind, parameters):
    assert bench.parse_model(name) == (name, kind)
    model = bench.load_model(name, kind, torch.float32, torch.device("meta"))  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_svd_benchmark_says_it_needs_cuda(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_svd.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "gpu_svd.py needs a CUDA device" in done.stderr
    assert not any(tmp_path.iterdir())
