"""The README's performance run: ``rosa bench`` with the settings below, into benchmarks/results/perf.{json,md}.

Extra arguments go to ``rosa bench`` and override these (e.g. ``--threads 2``, ``--models minilm``).
``--threads 1``: on a small shared machine, torch's multi-threaded kernels spin against other
processes and time out of all proportion; one thread per process measures the methods fairly.
"""

import sys
from pathlib import Path

from rosa.cli import main

DEFAULTS = [
    "bench", "--models", "minilm", "smollm2", "--seq-len", "128", "--steps", "10", "--warmup", "2",
    "--latency-reps", "12", "--threads", "1", "--out", str(Path(__file__).parent / "results"), "--name", "perf",
]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
