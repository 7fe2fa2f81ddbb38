"""Shared test helpers: where the real data lives, and loading a benchmark script as a module."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with a copy of shared/ beside it; ROSA_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("ROSA_SHARED_DATA") or REPO.parent / "shared" / "data")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
