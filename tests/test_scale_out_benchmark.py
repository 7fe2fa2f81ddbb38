"""benchmarks/scale_out.py --tiny: every measure is taken, written, and FSDP2 holds half of DDP's bytes per rank."""

from __future__ import annotations

import json
import math

import pytest
import torch.distributed as dist

from helpers import REPO, load_benchmark

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_tiny_scale_out_benchmark_writes_every_measure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # spawned processes import the benchmark by name
    scale_out = load_benchmark("scale_out")
    monkeypatch.setattr("sys.argv", ["scale_out.py", "--tiny", "--out", str(tmp_path)])
    scale_out.main()
    result = json.loads((tmp_path / "scale_out.json").read_text())
    assert set(result["ratios"]) == set(scale_out.GOALS) == set(result["goals_met"])
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    # parameters, gradients and optimizer state are split over the 2 ranks (up to uneven shards)
    assert 0.45 <= result["ratios"]["fsdp2_over_ddp_bytes"] <= 0.55
    assert set(result["busy_svd_seconds"]) == {"batched", "separate"}
    report = (tmp_path / "scale_out.md").read_text()
    assert "(c) training step under FSDP2, ROSA / LoRA" in report and "Produced " in report
