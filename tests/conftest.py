"""Tests run from the repository root; make the project importable from anywhere and keep runs CPU-only."""
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist every core already runs a worker, and many tests start stage processes of their own:
    # torch's default of one intra-op thread per core then puts several threads on each core, which spin at
    # their barriers. One thread per process (inherited by the processes the tests start) took two of the
    # slowest files from 4 min 6 s to 2 min 21 s on 2 cores. A serial run keeps torch's default.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """The `slow` marker: `pytest -m "not slow"` is the inner loop (under a minute); CI runs everything."""
    config.addinivalue_line("markers", "slow: runs stages, trains models or launches processes (seconds to "
                                       "minutes each); left out by -m 'not slow'")


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


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny LightningDiT in the reference's file layout (helpers.write_published)."""
    from helpers import write_published
    return write_published(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """Stage 1 output for 3 users with (N, 32, 4, 4) latents (helpers.write_latent_dir)."""
    from helpers import write_latent_dir
    return write_latent_dir(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny project tokenizer (helpers.make_tokenizer), shared by the session: tests read it, never write it."""
    from helpers import make_tokenizer
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.safetensors")


@pytest.fixture(scope="session")
def latents(tmp_path_factory, tokenizer):
    """Stage 1's folder from a real run of the script on helpers.make_dataset (users 1, 2, 10), shared by the
    session: tests that change latents copy them first."""
    from helpers import make_dataset, run_stage, stage1_args
    ws = tmp_path_factory.mktemp("stage1")
    proc = run_stage("stage1_extract_features.py", *stage1_args(make_dataset(ws / "data"), tokenizer, ws / "latents"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws / "latents"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, latents):
    """An uninterrupted stage 2 run of helpers.stage2_command (the reference of the kill -9 test), shared by the
    session: tests copy its checkpoints before they change them; rerunning the same command changes nothing."""
    import subprocess
    from helpers import ROOT, stage2_command
    out = tmp_path_factory.mktemp("stage2") / "trained"
    proc = subprocess.run(stage2_command(latents, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def latents_with_tokenizer(latent_dir, tokenizer, tmp_path_factory):
    """The shared tiny latents, their metadata naming `tokenizer` as stage 1 would."""
    from common.io import file_sha256, load_safetensors, save_safetensors
    out = tmp_path_factory.mktemp("latents_tok")
    for name in ("train", "val", "latent_stats"):
        tensors, meta = load_safetensors(latent_dir / f"{name}.safetensors")
        save_safetensors(tensors, out / f"{name}.safetensors",
                         {**meta, "tokenizer": tokenizer.name, "tokenizer_sha256": file_sha256(tokenizer)})
    return out
