"""What a stage 2 run leaves besides its checkpoints, and what stage 3 does with it: early.ckpt (a slim EMA
snapshot, the autoguidance guide), validation sample grids within a bounded share of the run, val_identity (the share
of unguided samples the noisy-latent classifier gives to their own user) and the classifier shipped to stage 3."""
import csv
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

import stage2_train_dit
from common.io import load_safetensors, save_safetensors
from generation.cli import GenerateOptions
from generation.generate import generate, load_generator
from helpers import (TINY_CLASSIFIER_FLAGS, TINY_DIT_MODEL_FLAGS, assert_user_error, make_module, make_tokenizer,
                     run_main)
from models.checkpoint import checkpoint_info, load_checkpoint
from models.lightningdit import TIME_SHIFT_TABLE
from training.checkpoints import early_step
from training.sample_grid import grid_due

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
S2, S3 = "stage2_train_dit.py", "stage3_inference.py"


def stage2(latents, out, *extra) -> list[str]:
    return ["--latent_dir", latents, "--output_dir", out, *TINY_DIT_MODEL_FLAGS, *TINY_CLASSIFIER_FLAGS,
            "--precision", "32-true", "--accelerator", "cpu", "--batch_size", "4", *extra]


@pytest.fixture(scope="module")
def run(latents_with_tokenizer, tokenizer, tmp_path_factory):
    """14 steps (epochs of 6), validations at steps 6, 12 and of the final weights at 14, early.ckpt at step 3."""
    out = tmp_path_factory.mktemp("levers") / "run"
    stale = out / "checkpoints" / "early.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_text("another run's")
    (out / "val_grids").mkdir()
    (out / "val_grids" / "step_000099.png").write_text("another run's")
    with mock.patch("training.sample_grid.GRID_TIME_SHARE", float("inf")):   # a grid at every validation
        stage2_train_dit.main([str(a) for a in stage2(
            latents_with_tokenizer, out, "--max_steps", 14, "--early_checkpoint_step", 3, "--time_shift_aug", 0.5,
            "--vavae_path", tokenizer, "--val_grid_users", 2, "--val_grid_samples", 2, "--lr", "1e-3")])
    return out


def same_entry(a, b) -> bool:
    """Equality of checkpoint entries that nest dicts, lists and tensors."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_entry(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_early_checkpoint_is_a_slim_ema_snapshot_stage3_can_load(run):
    early = load_checkpoint(run / "checkpoints" / "early.ckpt")        # the stale file was replaced
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert early["global_step"] == 3 and last["global_step"] > 3
    assert set(early) == {"state_dict", "pipeline", "global_step"}
    assert set(early["state_dict"]) == {k for k in last["state_dict"] if k.startswith("ema.")}
    assert same_entry(early["pipeline"], last["pipeline"])   # the same users, statistics and user classifier
    moved = [k for k, v in early["state_dict"].items() if not torch.equal(v, last["state_dict"][k])]
    assert "ema.final_layer.linear.weight" in moved                    # an earlier, different model
    model, info = load_generator(str(run / "checkpoints" / "early.ckpt"), "cpu")
    assert model.time_shift_embedder is not None and info.model_config["time_shift_cond"] is True


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_the_time_shift_condition_was_trained(run):
    table = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"][f"model.{TIME_SHIFT_TABLE}"]
    assert table.shape == (4, 32) and table.abs().sum() > 0            # zero-initialised, then learnt


def test_early_step_defaults_to_an_eighth_of_the_run():
    assert early_step(1400, None) == 175 and early_step(4, None) == 1 and early_step(1400, 0) == 0
    assert early_step(1400, 300) == 300


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_validation_grids_are_written_and_logged(run):
    grids = sorted(p.name for p in (run / "val_grids").iterdir())
    # the stale grid went; step 14 is the final weights' validation (validate_final_weights)
    assert grids == ["latest.png", "step_000006.png", "step_000012.png", "step_000014.png"]
    assert (run / "val_grids" / "latest.png").read_bytes() == (run / "val_grids" / "step_000014.png").read_bytes()
    from PIL import Image
    grid = np.asarray(Image.open(run / "val_grids" / "step_000012.png"))
    assert grid.shape[0] == 2 * (128 + 4)                                 # a row per user
    events = b"".join(p.read_bytes() for p in (run / "lightning_logs" / "tensorboard").glob("events.*"))
    assert events.count(b"val_grid") >= 3                                 # one image per validation


def test_grids_take_a_bounded_share_of_the_run():
    assert grid_due(0.0, 0.0, 0.0, 0.05)                 # the first validation always gets its grid
    assert not grid_due(6.0, 6.0, 200.0, 0.05)           # 12 s of grids in 200 s of training: > 5%
    assert grid_due(6.0, 6.0, 240.0, 0.05)               # 12 s in 240 s: within


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_validation_grid_noise_is_fixed(run, tokenizer, latents_with_tokenizer):
    """Two grids of the same weights are the same image: what changes between validations is the model."""
    from training.sample_grid import ValidationGrid
    module = make_module(latents_with_tokenizer)
    grid = ValidationGrid(str(tokenizer), run / "unused", users=2, samples=2)
    first, users = grid.sample(module)
    second, _ = grid.sample(module)
    assert users == [1, 2] and first.shape == (4, 64, 64, 3) and np.array_equal(first, second)
    assert not module.ema.training


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_stage2_without_tokenizer_notes_it_and_refuses_another_tokenizer_and_drops_a_stale_early_ckpt(latents_with_tokenizer, tmp_path, capsys):
    other = make_tokenizer(tmp_path / "other.safetensors", seed=1)
    result = run_main(capsys, S2, *stage2(latents_with_tokenizer, tmp_path / "a", "--max_steps", 1,
                                           "--vavae_path", other))
    assert_user_error(result, r"not the tokenizer that made the stage 1 latents", r"tok\.safetensors")
    stale = tmp_path / "b" / "checkpoints" / "early.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_text("another run's")
    result = run_main(capsys, S2, *stage2(latents_with_tokenizer, tmp_path / "b", "--max_steps", 1,
                                           "--early_checkpoint_step", 0))
    assert result.returncode == 0 and "pass --vavae_path" in result.stdout
    assert not (tmp_path / "b" / "val_grids").exists()
    assert not stale.exists()   # no early snapshot asked for: another run's must not pass for this one's


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_stage3_autoguidance_with_the_early_checkpoint(run, tokenizer, tmp_path):
    flags = dict(dit_checkpoint=str(run / "checkpoints" / "last.ckpt"), vavae_path=str(tokenizer), user_ids=[1, 2],
                 num_samples_per_user=1, guidance_scale=3.0, num_steps=4, device="cpu")
    auto = generate(GenerateOptions.defaults(output_dir=str(tmp_path / "auto"), **flags,
                                             guidance_checkpoint=str(run / "checkpoints" / "early.ckpt")),
                    log=lambda m: None)
    cfg = generate(GenerateOptions.defaults(output_dir=str(tmp_path / "cfg"), **flags), log=lambda m: None)
    assert [p.name for p in auto] == [p.name for p in cfg]
    assert any(a.read_bytes() != c.read_bytes() for a, c in zip(auto, cfg))   # another guide, other images


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_stage3_refuses_a_guide_of_other_users(run, tokenizer, latent_dir, tmp_path, capsys):
    tensors, meta = load_safetensors(latent_dir / "train.safetensors")
    other = tmp_path / "other_latents"
    shutil.copytree(latent_dir, other)
    save_safetensors(tensors, other / "train.safetensors", {**meta, "users": ["ID_1", "ID_2", "ID_4"],
                                                                 "user_numbers": [1, 2, 4]})
    result = run_main(capsys, S2, *stage2(other, tmp_path / "other_run", "--max_steps", 1, "--val_grid_users", 0,
                                           "--time_shift_aug", 0.5))
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_main(capsys, S3, "--dit_checkpoint", run / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                      "--output_dir", tmp_path / "out", "--user_ids", 1, "--num_steps", 2, "--device", "cpu",
                      "--guidance_checkpoint", tmp_path / "other_run" / "checkpoints" / "last.ckpt")
    assert_user_error(result, r"--guidance_checkpoint .* not trained on the same stage 1 latents and users",
                      r"ID_4", r"early\.ckpt")


def stage2_flags(latent_dir, out, *extra, epochs: int = 2) -> list:
    return ["--latent_dir", latent_dir, "--output_dir", out, *TINY_DIT_MODEL_FLAGS, "--precision", "32-true",
            "--accelerator", "cpu", "--batch_size", "4", "--max_epochs", str(epochs), "--classifier_steps", "30",
            *extra]


def test_stage2_logs_val_identity_and_ships_the_classifier_to_stage3(latents_with_tokenizer, tokenizer, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    first = run_main(capsys, S2, *stage2_flags(latents_with_tokenizer, out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("noisy-latent user classifier") == 1
    with open(out / "lightning_logs" / "csv" / "metrics.csv") as f:
        identity = [float(r["val_identity"]) for r in csv.DictReader(f) if r.get("val_identity")]
    # The first validation always scores; later ones within the time share (training/sample_grid.py).
    assert 1 <= len(identity) <= 2 and all(0.0 <= v <= 1.0 for v in identity)
    entry = checkpoint_info(load_checkpoint(out / "checkpoints" / "last.ckpt")).latent_classifier
    assert entry is not None and entry["config"]["num_classes"] == 3
    # A longer run resumes with the classifier it has instead of training another.
    again = run_main(capsys, S2, *stage2_flags(latents_with_tokenizer, out, epochs=3))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "noisy-latent user classifier" not in again.stdout
    best = checkpoint_info(load_checkpoint(out / "checkpoints" / "best.ckpt")).latent_classifier
    torch.testing.assert_close(best["state_dict"], entry["state_dict"])
    # Stage 3 guides with it: other images than classifier-free guidance alone, the same for the same seed.
    common = ["--dit_checkpoint", out / "checkpoints" / "best.ckpt", "--vavae_path", tokenizer, "--user_ids", "1", "2",
              "--num_samples_per_user", "2", "--num_steps", "4", "--device", "cpu"]
    images = {}
    for name, extra in (("cfg", []), ("cg", ["--classifier_scale", "50"]), ("cg_again", ["--classifier_scale", "50"])):
        result = run_main(capsys, S3, *common, "--output_dir", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        images[name] = (tmp_path / name / "micro_doppler_user01_001.png").read_bytes()
    assert images["cg"] != images["cfg"] and images["cg"] == images["cg_again"]


def test_classifier_guidance_without_a_classifier_is_refused(latent_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(capsys, S2, *stage2_flags(latent_dir, out, "--classifier_steps", "0")).returncode == 0
    ckpt = out / "checkpoints" / "best.ckpt"
    assert checkpoint_info(load_checkpoint(ckpt)).latent_classifier is None
    result = run_main(capsys, S3, "--dit_checkpoint", ckpt, "--vavae_path", tmp_path / "unused.safetensors",
                      "--output_dir", tmp_path / "gen", "--user_ids", "1", "--classifier_scale", "2")
    assert_user_error(result, r"--classifier_scale 2 needs the noisy-latent user classifier", r"--classifier_steps 0")


def test_sample_identity_is_one_for_a_person_specific_model_and_chance_for_one_that_ignores_the_user():
    """Data = a point mass per user: the exact conditional velocity carries noise to the user's own point, the
    label-blind one to a common point; a nearest-mean classifier scores the samples."""
    from training.latent_classifier import sample_identity
    torch.manual_seed(0)
    means = torch.randn(4, 2, 2, 2) * 3

    class NearestMean(torch.nn.Module):
        def forward(self, x, t):
            return -((x[:, None] - means[None]) ** 2).flatten(2).sum(-1)

    def person_specific(x, t, y):
        return (means[y] - x) / (1 - t.view(-1, 1, 1, 1))

    def label_blind(x, t, y):
        return (means[0] - x) / (1 - t.view(-1, 1, 1, 1))
    assert sample_identity(person_specific, NearestMean(), 4, 5, (2, 2, 2)) == 1.0
    assert sample_identity(label_blind, NearestMean(), 4, 5, (2, 2, 2)) == 0.25   # every sample is user 0's
