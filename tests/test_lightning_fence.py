"""Lightning's private names behind one fence (training/lightning_private.py): this Lightning has them all; where a
release renamed them, stage 2 still trains, with Lightning's own launcher and a one-line note, and the same
weights."""
import os
import subprocess
import textwrap

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

import models.lightningdit as lightningdit
import training.lightning_private as fence
import training.launch as launch
import training.train_dit as td
from helpers import PYTHON, ROOT, stage2_args
from test_gpu_path import fp16_like_a_t4
from training.cli import training_options

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                 "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME")


def all_missing(monkeypatch) -> None:
    """The fence as on a Lightning (and torch) release that renamed every private name the project uses."""
    monkeypatch.setattr(fence, "SubprocessScriptLauncher", None)
    monkeypatch.setattr(fence, "set_num_threads_if_needed", None)
    monkeypatch.setattr(fence, "HAS_CONFIGURE_LAUNCHER", False)
    monkeypatch.setattr(fence, "HAS_SCALE_ASYNC", False)
    monkeypatch.setattr(fence, "STRATEGY_LAUNCHER", "_launcher_renamed")
    monkeypatch.setattr(fence, "LOGGING_STEP_COUNT", "_batches_that_stepped_renamed")


def test_this_lightning_has_every_private_name():
    """Fails on a release that renamed one (CI runs the newest and the lowest Lightning): stage 2 would still
    train, without the watch or with the fallbacks, and this says which name to look for."""
    assert fence.missing_launcher_names() == []
    assert fence.HAS_SCALE_ASYNC
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert fence.set_logging_step(trainer, 7) and trainer.fit_loop.epoch_loop._batches_that_stepped == 7


def test_loss_scale_reads_the_same_without_the_private_accessor(monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    assert float(fence.loss_scale(scaler)) == 2.0 ** 10          # before the first step: the initial scale
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=2.0 ** 9)
    with_accessor = fence.loss_scale(scaler)
    monkeypatch.setattr(fence, "HAS_SCALE_ASYNC", False)
    assert torch.equal(fence.loss_scale(scaler), with_accessor) and float(with_accessor) == 2.0 ** 9


#################################################################################
#                         Which launcher a --devices 2 run gets                 #
#################################################################################

def plain_two_device_trainer(tmp_path, monkeypatch, notes: list) -> pl.Trainer:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    args = training_options(["--latent_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                             "--accelerator", "cpu", "--devices", "2"])
    return td.build_trainer(args, "32-true", tmp_path / "out", [], log=notes.append)


@pytest.mark.parametrize("missing", ["SubprocessScriptLauncher", "set_num_threads_if_needed",
                                     "HAS_CONFIGURE_LAUNCHER", "STRATEGY_LAUNCHER"])
def test_without_the_private_launcher_names_lightnings_own_launcher_runs_with_a_note(tmp_path, monkeypatch,
                                                                                     missing):
    notes = []
    assert type(plain_two_device_trainer(tmp_path, monkeypatch, notes).strategy.launcher) is launch.WatchedLauncher
    assert notes == []
    monkeypatch.setattr(fence, missing, "_launcher_renamed" if missing == "STRATEGY_LAUNCHER" else None)
    trainer = plain_two_device_trainer(tmp_path, monkeypatch, notes)
    assert type(trainer.strategy.launcher) is _SubprocessScriptLauncher   # Lightning's own, which still works
    assert len(notes) == 1 and notes[0].startswith("note: this PyTorch Lightning lacks ") and "\n" not in notes[0]


def test_a_subclass_of_lightnings_launcher_is_watched_too(tmp_path, monkeypatch):
    """A release that attaches a subclass of _SubprocessScriptLauncher: `type(...) is` dropped the watch."""
    import pytorch_lightning.strategies.ddp as ddp

    class NewerLauncher(_SubprocessScriptLauncher):
        pass
    monkeypatch.setattr(ddp, "_SubprocessScriptLauncher", NewerLauncher)
    notes = []
    trainer = plain_two_device_trainer(tmp_path, monkeypatch, notes)
    assert type(trainer.strategy.launcher) is launch.WatchedLauncher and notes == []


#################################################################################
#                    Training on a Lightning without the names                  #
#################################################################################

def inf_output_at(monkeypatch, calls: set[int]) -> list[int]:
    """The DiT's output is inf at these training forwards (from 1) of each run: fp16 loss scaling skips those
    steps. Returns the forward count, which a run resets to [0]."""
    real, count = lightningdit.LightningDiT.forward, [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            count[0] += 1
            out = out * float("inf") if count[0] in calls else out
        return out
    monkeypatch.setattr(lightningdit.LightningDiT, "forward", forward)
    return count


@pytest.mark.slow   # trains stage 2 four times in this process (seconds)
def test_stage2_trains_and_resumes_the_same_with_every_private_name_missing(tmp_path, latent_dir, monkeypatch,
                                                                            capsys):
    """16-mixed as on a T4, 4 steps, then resumed at the epoch end to 8, two steps skipped in each part: the
    weights, the EMA and the skip count are those of the run with the names, and the resume notes the logging
    step."""
    fp16_like_a_t4(monkeypatch)
    forwards = inf_output_at(monkeypatch, {2, 3})

    def run(out, steps):
        forwards[0] = 0
        args = training_options(stage2_args(latent_dir, out, "--precision", "16-mixed", "--max_steps", steps,
                                            "--batch_size", 6, "--classifier_steps", 0, "--log_every_n_steps", 1))
        td.train(args, log=lambda m: None)
        return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    run(tmp_path / "with", 4)
    with_names = run(tmp_path / "with", 8)
    all_missing(monkeypatch)
    run(tmp_path / "without", 4)
    without_names = run(tmp_path / "without", 8)
    assert without_names["global_step"] == 8 and without_names["skipped_steps"] == with_names["skipped_steps"] == 4
    assert with_names["state_dict"].keys() == without_names["state_dict"].keys()
    for key, value in with_names["state_dict"].items():
        assert torch.equal(without_names["state_dict"][key], value), key
    assert capsys.readouterr().out.count("metrics.csv may log steps one ahead") == 1


# Lightning itself keeps working after the rename (its modules hold their own references); the project's fence
# finds nothing.
RENAMED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import lightning_fabric.utilities.distributed as fabric_distributed
    import pytorch_lightning.strategies.launchers.subprocess_script as subprocess_script
    del subprocess_script._SubprocessScriptLauncher, fabric_distributed._set_num_threads_if_needed
    import stage2_train_dit
    stage2_train_dit.main(sys.argv[1:])
""")


@pytest.mark.slow   # two DDP processes on the CPU (tens of seconds)
def test_devices_2_on_a_lightning_without_the_launcher_names(tmp_path, latent_dir):
    """The import no longer stops every stage 2 run: --devices 2 trains under Lightning's launcher, with one note."""
    driver = tmp_path / "driver.py"
    driver.write_text(RENAMED.format(root=str(ROOT)))
    proc = subprocess.run([PYTHON, driver, *stage2_args(latent_dir, tmp_path / "ddp", "--devices", 2, "--max_steps", 2,
                                                        "--classifier_steps", 0, "--val_identity_samples", 0)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("note: this PyTorch Lightning lacks _SubprocessScriptLauncher, "
                             "_set_num_threads_if_needed") == 1, proc.stdout
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
