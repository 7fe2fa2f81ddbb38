"""Test-wide settings: no network, quiet progress bars, a small hypothesis budget."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ROSA_NO_PROGRESS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Small tensors: one thread avoids oversubscription when tests spawn processes or share the CPU.
torch.set_num_threads(1)

settings.register_profile("rosa", max_examples=25, deadline=None)
settings.load_profile("rosa")
