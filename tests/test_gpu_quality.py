"""experiments/gpu_quality.sh, the prepared GPU quality run, at its tiny CPU size: every stage runs on recordings in
the mmGait layout (made here: 3 people) and one JSON comes out with each part's time and the headline numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_recordings(folder: Path, people=(2, 11, 22), frames: int = 400) -> Path:
    """vol<NNN>.npz files as ../shared/data/mmgait60 holds them: hist (32, F) counts of radial velocities per frame,
    each person walking at their own speed (the histogram's peak bin), so the people differ."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, person in enumerate(people):
        peak = 10 + 6 * k + np.round(2 * np.sin(np.arange(frames) / 15)).astype(int)
        hist = rng.poisson(0.3, size=(32, frames)).astype(np.float32)
        hist[peak, np.arange(frames)] += rng.poisson(8, size=frames)
        np.savez(folder / f"vol{person:03d}.npz", hist=hist, velocity_mps=np.linspace(-2.35, 2.2, 32),
                 frame_ids=np.arange(frames))
    return folder


@pytest.mark.slow
def test_gpu_quality_runs_every_stage_at_tiny_size_and_writes_one_json(tmp_path):
    source = write_recordings(tmp_path / "recordings")
    out = tmp_path / "out"
    env = {**os.environ, "SIZE": "tiny", "SOURCE": str(source), "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_quality.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_quality.json").read_text())
    assert set(summary["seconds"]) == {"render", "tokenizer", "stage1", "stage2", "stage3", "stage4"}
    assert all(v > 0 for v in summary["seconds"].values())
    for key in ("identity", "ceiling_real_val", "tstr", "copy_rate"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["identity_ci"][0] <= summary["identity"] <= summary["identity_ci"][1]
    # Stage 3 guided with the classifier the run's stage 2 trained: 3 people x 2 samples.
    assert "--classifier_scale" in summary["stage3_flags"]
    assert len(list((out / "samples").glob("micro_doppler_user*_*.png"))) == 6


def test_gpu_quality_refuses_an_unknown_size(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_quality.sh")], capture_output=True, text=True,
                          env={**os.environ, "SIZE": "huge", "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and "SIZE must be gpu or tiny" in proc.stdout
