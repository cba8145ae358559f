"""Tests run from the repository root; make the project importable from anywhere and keep runs CPU-only."""
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@contextmanager
def _one_torch_thread():
    """Small convs gain nothing from threads, and on a busy 2-core box thread barriers cost 10x."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op torch thread for a whole module, its module-scoped fixtures included
    (pytestmark = pytest.mark.usefixtures("one_thread_per_module"))."""
    with _one_torch_thread():
        yield
