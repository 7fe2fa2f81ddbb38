"""Test-wide settings: no network, quiet progress bars, a small hypothesis budget."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ROSA_NO_PROGRESS", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("rosa", max_examples=25, deadline=None)
settings.load_profile("rosa")
