"""Stage 2's checkpoints: the final state is always in last.ckpt, best.ckpt is slim and can be the final
weights, a resume honours or refuses every changed flag, and one run per --output_dir."""
import csv
import json
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers import PYTHON, ROOT, TINY_CLASSIFIER_FLAGS, TINY_DIT_FLAGS, assert_user_error, run_main
from training.cli import training_options
from training.train_dit import train

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
BATCH = 6    # the latent_dir fixture's 24 train latents: 4 steps an epoch


def stage2_flags(latent_dir: Path, out: Path, *extra) -> list[str]:
    return ["--latent_dir", str(latent_dir), "--output_dir", str(out), "--batch_size", str(BATCH),
            *TINY_DIT_FLAGS, *TINY_CLASSIFIER_FLAGS, "--log_every_n_steps", "1", *map(str, extra)]


def run(latent_dir: Path, out: Path, *extra, log=lambda m: None) -> Path:
    return train(training_options(stage2_flags(latent_dir, out, *extra)), log=log)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


#################################################################################
#                      The final state, whatever the cadence                    #
#################################################################################

@pytest.mark.parametrize("flags, final_step", [
    (["--max_epochs", 3, "--val_every_n_epochs", 2], 12),                            # the last epoch unvalidated
    (["--max_steps", 7, "--checkpoint_every_n_steps", 5, "--val_every_n_epochs", 1000], 7),   # mid-epoch end
    (["--max_steps", 10, "--checkpoint_every_n_steps", 3, "--val_every_n_epochs", 1], 10),
    (["--max_epochs", 2, "--checkpoint_every_n_steps", 1000, "--val_every_n_epochs", 1], 8),  # epoch end, validated
], ids=["val_every_2", "max_steps_7_every_5", "max_steps_10_every_3", "epochs_2"])
@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_final_state_is_in_last_and_best_can_be_it(tmp_path, latent_dir, flags, final_step):
    returned = run(latent_dir, tmp_path, *flags)
    last, best = load(tmp_path / "checkpoints" / "last.ckpt"), load(tmp_path / "checkpoints" / "best.ckpt")
    assert last["global_step"] == final_step
    # The final weights were validated: best.ckpt is them, or an earlier validation that scored lower.
    with open(tmp_path / "lightning_logs" / "csv" / "metrics.csv", newline="") as f:
        val = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f) if r["val_loss"]]
    assert val[-1][0] in (final_step - 1, final_step), val   # Lightning logs an epoch end at its last batch's step
    assert best["val_loss"] == pytest.approx(min(v for _, v in val), rel=1e-6)
    assert best["global_step"] < final_step or best["val_loss"] == pytest.approx(val[-1][1], rel=1e-6)
    assert returned == tmp_path / "checkpoints" / "best.ckpt"
    if best["global_step"] == final_step:   # the same EMA weights as the final state's
        for key, value in best["state_dict"].items():
            assert torch.equal(last["state_dict"][key], value), key


def test_best_is_slim_and_serves_sampling_and_init_from(tmp_path, latent_dir):
    from generation.generate import load_generator
    from training.init_from import load_pretrained
    # Without the user classifier (a fixed ~1 MB in every file), which outweighs this tiny DiT.
    run(latent_dir, tmp_path, "--max_steps", 4, "--val_every_n_epochs", 1, "--classifier_steps", 0)
    folder = tmp_path / "checkpoints"
    best, last = load(folder / "best.ckpt"), load(folder / "last.ckpt")
    assert set(best) == {"state_dict", "pipeline", "global_step", "epoch", "val_loss"}
    ema = {k: v for k, v in last["state_dict"].items() if k.startswith("ema.")}
    assert best["state_dict"].keys() == ema.keys() and len(ema) < len(last["state_dict"])
    assert best["pipeline"].keys() == last["pipeline"].keys() and best["pipeline"]["users"] == last["pipeline"]["users"]
    assert last["optimizer_states"] and any(k.startswith("model.") for k in last["state_dict"])
    # Weights + 2 AdamW moments + EMA in last.ckpt, the EMA alone in best.ckpt: about a quarter.
    ratio = (folder / "best.ckpt").stat().st_size / (folder / "last.ckpt").stat().st_size
    assert 0.15 < ratio < 0.4, ratio
    model, info = load_generator(str(folder / "best.ckpt"), "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[f"ema.{key}"]), key
    assert load_pretrained(folder / "best.ckpt").picked.endswith("ema.*")


# A model large enough that its tensors outweigh the files' per-tensor records and metadata many times over.
SIZED = dict(depth=2, hidden_size=128)


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_checkpoint_sizes_follow_the_formula(tmp_path, latent_dir, finetune):
    """training.memory.checkpoint_bytes (the README's Kaggle disk table, --check_memory's disk line) against
    files written by a real run: the tensors it counts are all there, and nothing else of their size."""
    from helpers import tiny_dit
    from training.memory import checkpoint_bytes
    from training.memory_check import setup_from_args
    extra = [a for k, v in SIZED.items() for a in (f"--{k}", v)]
    if finetune == "lora":
        torch.save(tiny_dit(**SIZED).state_dict(), tmp_path / "published.pt")
        extra += ["--init_from", tmp_path / "published.pt", "--finetune", "lora", "--lora_rank", 4]
    args = training_options(stage2_flags(latent_dir, tmp_path / "run", "--max_steps", 1, *extra))
    train(args, log=lambda m: None)
    expected = checkpoint_bytes(setup_from_args(args, cuda=False)[0])
    for name in ("best", "early", "last"):
        path = tmp_path / "run" / "checkpoints" / f"{name}.ckpt"
        with zipfile.ZipFile(path) as archive:
            records = len(archive.namelist())
        # Each tensor is a zip record (headers, name, 64-byte alignment: < 1 KB); the pickled training state
        # (loops, flags, pipeline info) is tens of kilobytes.
        assert expected[name] <= path.stat().st_size <= expected[name] + 1024 * records + 64 * 1024, name
    assert expected["peak"] == 2 * expected["last"] + expected["best"] + expected["early"]


@pytest.mark.parametrize("config", ["configs/kaggle_2xT4.yaml", "configs/kaggle_2xT4_xl_lora.yaml"])
def test_kaggle_configs_checkpoints_fit_kaggle_working(config):
    """/kaggle/working holds ~20 GB; leave 5 GB for the latents, tokenizer, samples and logs. The published
    10.8 GB file must come from a dataset under /kaggle/input, which does not count."""
    from training.memory import checkpoint_bytes
    from training.memory_check import setup_from_args
    args = training_options(["--config", config, "--latent_dir", "unused", "--output_dir", "unused"])
    assert checkpoint_bytes(setup_from_args(args, cuda=True)[0])["peak"] <= 15e9
    assert args.init_from is None or args.init_from.startswith("/kaggle/input/")


#################################################################################
#                               Resume and flags                                #
#################################################################################

@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_resume_applies_changed_optimizer_flags_and_says_so(tmp_path, latent_dir):
    run(latent_dir, tmp_path, "--max_steps", 4, "--lr", 1e-3, "--val_every_n_epochs", 1000)
    seen = {}

    class Groups(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("groups", [dict(g) for g in trainer.optimizers[0].param_groups])

    lines = []
    args = training_options(stage2_flags(latent_dir, tmp_path, "--max_steps", 6, "--lr", 2e-4, "--beta2", 0.95,
                                         "--backbone_lr_scale", 0.5, "--val_every_n_epochs", 1000))
    train(args, log=lines.append, callbacks=[Groups()])
    message = next(m for m in lines if m.startswith("resuming"))
    assert "at step 4" in message and "--lr changed from 0.001 to 0.0002" in message, message
    assert "--beta2 changed from 0.999 to 0.95" in message and "--backbone_lr_scale changed from 1.0 to 0.5" in message
    assert "same flags" not in message
    lrs = sorted(g["lr"] for g in seen["groups"])
    assert lrs == pytest.approx([1e-4, 2e-4]) and all(g["betas"] == (0.9, 0.95) for g in seen["groups"])
    assert load(tmp_path / "checkpoints" / "last.ckpt")["stage2_flags"]["lr"] == 2e-4


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_resume_with_the_same_flags_says_so(tmp_path, latent_dir):
    run(latent_dir, tmp_path, "--max_steps", 2, "--val_every_n_epochs", 1000)
    lines = []
    run(latent_dir, tmp_path, "--max_steps", 2, "--val_every_n_epochs", 1000, log=lines.append)
    assert any("at step 2 with the same flags as before" in m for m in lines), lines


@pytest.mark.parametrize("first, then, patterns", [
    (["--weight_decay", 0], ["--weight_decay", 0.05], [r"--weight_decay 0 and > 0 group the parameters differently"]),
    ([], ["--max_steps", 2], [r"at step 4, past the 2 steps", r"--restart"]),
    ([], ["--finetune", "partial"], [r"--finetune changed from full to partial", r"--restart"]),
], ids=["weight_decay_groups", "shorter", "finetune"])
@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_resume_refuses_what_it_cannot_honour(tmp_path, latent_dir, capsys, first, then, patterns):
    run(latent_dir, tmp_path, "--max_steps", 4, "--val_every_n_epochs", 1000, *first)
    proc = run_main(capsys, "stage2_train_dit.py", *stage2_flags(latent_dir, tmp_path, "--max_steps", 4,
                                                                  "--val_every_n_epochs", 1000, *then))
    assert_user_error(proc, *patterns)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


#################################################################################
#                              One run per folder                               #
#################################################################################

@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_a_second_run_into_the_same_folder_is_refused(tmp_path, latent_dir, capsys):
    lock = tmp_path / "stage2.lock"
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}))
        proc = run_main(capsys, "stage2_train_dit.py", *stage2_flags(latent_dir, tmp_path, "--max_steps", 2))
        assert_user_error(proc, rf"another stage 2 run \(pid {sleeper.pid} on ", r"another --output_dir")
        assert not (tmp_path / "checkpoints").exists() and lock.is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner is gone: the lock is taken over with a note, and released at the end.
    lines = []
    run(latent_dir, tmp_path, "--max_steps", 2, log=lines.append)
    assert any(f"left by stage 2 process {sleeper.pid}" in m for m in lines), lines
    assert not lock.exists() and load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


#################################################################################
#                            benchmarks/gpu_check.py                            #
#################################################################################

def test_gpu_check_keeps_finished_parts_and_frees_checkpoints_as_it_goes(tmp_path, monkeypatch):
    """A run stopped in its second training part (a time limit) leaves a JSON with stage 1, the first
    part and the versions; each part's checkpoints are gone before the next part starts."""
    import sys
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    monkeypatch.setattr("data.simulate.write_dataset", lambda *a, **k: None)
    monkeypatch.setattr(gpu_check, "make_tokenizer", lambda path, smoke: path)
    monkeypatch.setattr(gpu_check, "check_stage1", lambda *a: {"images_per_s": 1.0})
    seen = []

    def fake_stage2(latents, out, model, precision, grad_checkpointing, sizes, smoke):
        seen.append(sorted(p.name for p in out.parent.glob("dit_*")))
        if len(seen) == 2:
            raise KeyboardInterrupt   # the time limit
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.ckpt").write_bytes(b"x" * 100)
        return {"latents_per_s": 2.0}
    monkeypatch.setattr(gpu_check, "check_stage2", fake_stage2)
    out = tmp_path / "check.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu_smoke", "--json_out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main()
    assert seen == [[], []]   # dit_0 was deleted before the second part began
    result = json.loads(out.read_text())
    assert result["stage1"]["ok"] and result["stage2"][0]["latents_per_s"] == 2.0 and len(result["stage2"]) == 1
    assert result["lightning"] and "cuda_driver" in result and "cuda_runtime" in result
