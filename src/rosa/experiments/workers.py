"""Worker processes for long experiment runs: fresh interpreters that stop when their parent dies."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (no forked torch state), each of which exits within about a
    second once the process that made the pool is gone, so a killed run leaves no orphan training on."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(),))


def exit_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """End this process (from a daemon thread) as soon as ``parent`` is no longer its parent process."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
