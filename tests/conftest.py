"""Tests run from the repository root; make the project importable from anywhere and keep runs CPU-only."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def one_thread():
    """Small convs gain nothing from threads, and on a busy 2-core box thread barriers cost 10x."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
