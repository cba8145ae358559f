"""Interrupted training resumes: kill -9 and SIGTERM mid-run resume bit for bit, a finished run resumes at its end
and changes nothing, --restart trains anew, and a resume that would mix two runs (other latents, another
architecture) is refused naming what differs. The optimizer-flag and run-length checks are in test_checkpoints."""
import csv
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from common.io import load_safetensors, save_safetensors
from helpers import (EVERY, ROOT, STEPS, assert_user_error, load_ckpt, run_main, stage2_args, stage2_command,
                     train_in_process)

S2 = "stage2_train_dit.py"


@pytest.mark.slow
def test_resume_with_other_architecture_is_named(tmp_path, latents, trained, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    proc = run_main(capsys, S2, *stage2_args(latents, out, "--max_steps", STEPS + 2), "--hidden_size", "64")
    assert_user_error(proc, r"last\.ckpt was trained with a different model",
                      r"hidden_size: 32 in the checkpoint, 64 now",
                      r"--restart")


def _other_stats(latents: Path) -> None:
    tensors, meta = load_safetensors(latents / "latent_stats.safetensors")
    save_safetensors({"mean": tensors["mean"] + 0.5, "std": tensors["std"]}, latents / "latent_stats.safetensors", meta)


def _other_tokenizer(latents: Path) -> None:
    tensors, meta = load_safetensors(latents / "train.safetensors")
    save_safetensors(tensors, latents / "train.safetensors", {**meta, "tokenizer_sha256": "ab" * 32})


def _other_users(latents: Path) -> None:
    tensors, meta = load_safetensors(latents / "train.safetensors")
    save_safetensors(tensors, latents / "train.safetensors",
                     {**meta, "users": ["ID_1", "ID_2", "ID_11"], "user_numbers": [1, 2, 11]})


@pytest.mark.parametrize("change, pattern", [
    (_other_stats, r"latent statistics \(mean\) differ"),
    (_other_tokenizer, r"tokenizer sha256: [0-9a-f]{12}\.\.\. \(tok\.safetensors\) in the checkpoint, abababababab"),
    (_other_users, r"users: \['ID_1', 'ID_2', 'ID_10'\] in the checkpoint, \['ID_1', 'ID_2', 'ID_11'\] now"),
], ids=["stats", "tokenizer", "users"])
@pytest.mark.slow
def test_resume_on_other_latents_is_refused(tmp_path, latents, trained, capsys, change, pattern):
    """Stage 1 redone (other images, another tokenizer): resuming would mix the two runs."""
    out, other = tmp_path / "run", tmp_path / "latents"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    shutil.copytree(latents, other)
    change(other)
    proc = run_main(capsys, S2, *stage2_args(other, out, "--max_steps", STEPS + 2))
    assert_user_error(proc, r"last\.ckpt was trained on other stage 1 latents", pattern, r"--restart")


@pytest.mark.slow
def test_restart_trains_anew_and_removes_the_stale_best(tmp_path, latents, trained):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "checkpoints" / "best.ckpt")   # the old run's best
    assert load_ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    # The new run validates only its final weights (step 4): best.ckpt is the new run's.
    best = train_in_process(latents, out, "--log_every_n_steps", 1, "--restart", "--max_steps", 4,
                            "--checkpoint_every_n_steps", 2, "--val_every_n_epochs", 1000)
    assert best == out / "checkpoints" / "best.ckpt" and load_ckpt(best)["global_step"] == 4
    assert load_ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 4


def _progress_step(log: str) -> int:
    """The highest step the progress lines show (a log file is not a terminal: 'stage 2: step k/N ...')."""
    return max((int(k) for k in re.findall(r"^stage 2: step (\d+)/", log, re.M)), default=-1)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
@pytest.mark.slow
def test_kill9_and_rerun_resumes_exactly(tmp_path, latents, trained, stop):
    """kill -9 (nothing runs after it) and SIGTERM (a scheduler's or Kaggle's stop: Lightning ends the run) mid-run:
    the last periodic last.ckpt is whole and the rerun resumes from it bit for bit."""
    out = tmp_path / "run"
    cmd = stage2_command(latents, out)
    last = out / "checkpoints" / "last.ckpt"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        deadline = time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None:
                if last.is_file() and _progress_step(log_path.read_text()) > EVERY + 1:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "stage 2 ended before it could be killed:\n" + log_path.read_text()[-2000:]
            os.kill(proc.pid, stop)
            if stop == signal.SIGTERM:   # it stops by itself, releasing its lock
                proc.wait(timeout=120)
                assert not (out / "stage2.lock").exists()
        finally:
            proc.kill()
            proc.wait()
    killed_at = load_ckpt(last)["global_step"]
    assert 0 < killed_at < STEPS and killed_at % EVERY == 0
    assert "stage 2 done" not in log_path.read_text()

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {last} at step {killed_at}" in rerun.stdout
    assert "dataloader is not resumable" not in rerun.stderr

    ref, got = load_ckpt(trained / "checkpoints" / "last.ckpt"), load_ckpt(last)
    assert got["global_step"] == ref["global_step"] == STEPS
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for key, value in ref["state_dict"].items():   # model and EMA weights: bit for bit on one device
        assert torch.equal(got["state_dict"][key], value), (key, (got["state_dict"][key] - value).abs().max())

    def metrics(run: Path) -> dict:
        with open(run / "lightning_logs" / "csv" / "metrics.csv") as f:
            return {(r["step"], k): float(v) for r in csv.DictReader(f) for k, v in r.items()
                    if v and k in ("train_loss_step", "val_loss")}
    assert metrics(out) == metrics(trained)   # the history from before the kill is kept


@pytest.mark.slow
def test_stage2_is_deterministic_and_resume_picks_up_finished_run(trained, latents):
    """Same command again on a finished run: resumes at the end, changes nothing."""
    before = load_ckpt(trained / "checkpoints" / "last.ckpt")
    proc = subprocess.run(stage2_command(latents, trained), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"at step {STEPS}" in proc.stdout, proc.stderr[-2000:]
    after = load_ckpt(trained / "checkpoints" / "last.ckpt")
    for key, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], value), key
