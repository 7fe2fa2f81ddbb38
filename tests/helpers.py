"""Shared test helpers: where the real data lives, a benchmark module, relative error."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with a copy of shared/ beside it; ROSA_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("ROSA_SHARED_DATA") or REPO.parent / "shared" / "data")
GLUE_DIR = SHARED_DATA / "glue"
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(),
                                reason=f"GLUE data not found under {GLUE_DIR} (set ROSA_SHARED_DATA)")


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks.<name>``."""
    return importlib.import_module(f"benchmarks.{name}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (``||b||`` floored at 1e-12), for tensors of any dtype and device."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
