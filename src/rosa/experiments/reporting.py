"""Shared output helpers for the experiment runners: result JSON, tables, plots, progress bars."""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm


RECORDED_LIBRARIES = ("transformers", "peft")  # besides torch, the versions that can change a run's numbers


def library_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What produced a result: date, platform, CPU count, torch and library versions, accelerator."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        **{name: library_version(name) for name in RECORDED_LIBRARIES},
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temp file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".4g") -> str:
    """A GitHub-markdown table of ``rows`` (dicts) with the given ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return format(value, floatfmt)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: str | Path, title: str, body: str, machine: dict[str, Any]) -> Path:
    """Write a markdown report: a title, ``body`` and the machine/date line that produced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = f"{machine['date']}, {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}"
    if machine.get("cuda"):
        where += f", {machine['cuda']}"
    path.write_text(f"# {title}\n\n{body}\n\nProduced {where}.\n")
    return path


def progress(iterable: Iterable, desc: str, total: int | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr (disabled when ``ROSA_NO_PROGRESS=1``)."""
    disable = os.environ.get("ROSA_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def new_figure(ncols: int, width: float = 5.5, height: float = 4.0):
    """A matplotlib figure with ``ncols`` axes side by side, using the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str | Path) -> Path:
    """Save and close ``fig`` as a PNG; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_peak_memory() -> bool:
    """Start a new peak-memory window for :func:`peak_memory_mb`; False where the platform cannot.

    On CUDA this resets ``torch.cuda``'s peak statistics; on Linux it first hands freed heap
    memory back to the OS (garbage collection, glibc ``malloc_trim``), so the window starts from
    what is live, then resets the process's resident-set high-water mark
    (``/proc/self/clear_refs``), which ``ru_maxrss`` reports.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    gc.collect()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _trim_heap() -> None:
    """Return freed malloc memory to the OS where glibc allows it; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(since_reset: bool = False) -> dict[str, Any]:
    """Peak memory in MiB and what it measures: CUDA allocated memory, or on CPU the process's peak RSS.

    ``since_reset`` says whether :func:`reset_peak_memory` succeeded at the start of the measured
    window; the ``kind`` text records whether the number covers that window or the whole process.
    """
    if torch.cuda.is_available():
        return {"mb": torch.cuda.max_memory_allocated() / 2**20, "kind": "torch.cuda.max_memory_allocated"}
    import resource  # Unix only

    window = "since the last reset" if since_reset else "whole process so far"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mb": maxrss / (2**20 if sys.platform == "darwin" else 1024),
            "kind": f"process peak RSS (getrusage ru_maxrss, {window}; includes the Python runtime and data)"}
