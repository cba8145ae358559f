"""Identity levers: autoguidance with the run's early checkpoint, a guidance interval with an end,
non-leaking time-shift augmentation, and the validation sample grids of stage 2."""
import functools
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

import stage2_train_dit
import training.dit_module as dm
from common.errors import PipelineError
from common.io import load_safetensors, save_safetensors
from generation.cli import GenerateOptions
from generation.generate import check_sampling, generate, load_generator
from helpers import (TINY_CLASSIFIER_FLAGS, TINY_DIT, TINY_DIT_MODEL_FLAGS, assert_user_error, make_module,
                     make_tokenizer, run_main, tiny_dit)
from models.checkpoint import PipelineInfo, load_checkpoint
from models.lightningdit import TIME_SHIFT_TABLE, LightningDiT, model_config
from models.transport import guidance_switches, guided_velocity, sample_ode
from training.augment import random_time_shifts, shift_time
from training.checkpoints import early_step
from training.sample_grid import grid_due

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
S2, S3 = "stage2_train_dit.py", "stage3_inference.py"


#################################################################################
#                                 Guidance                                      #
#################################################################################

def constant_model(value_of_label):
    """A velocity model whose output is value_of_label(y) everywhere; it records the labels it saw."""
    def model(x, t, y):
        model.seen.append(y.tolist())
        return torch.tensor([value_of_label(int(v)) for v in y]).view(-1, 1) * torch.ones_like(x)
    model.seen = []
    return model


def test_autoguidance_guides_with_the_conditional_prediction_of_the_guide():
    good = constant_model(lambda y: 10.0 + y)
    bad = constant_model(lambda y: 4.0 + y)   # the guide's conditional velocity, never its null class
    y = torch.tensor([1, 2])
    v = guided_velocity(good, y, null_class=9, scale=3.0, guide_model=bad)(torch.zeros(2, 3), torch.tensor(0.5))
    assert good.seen == [[1, 2]] and bad.seen == [[1, 2]]
    # v_bad + w (v_good - v_bad) = (4 + y) + 3 * 6
    torch.testing.assert_close(v[:, 0], torch.tensor([5.0 + 18, 6.0 + 18]))


def test_guidance_interval_end_leaves_late_steps_conditional_only():
    model = constant_model(lambda y: -1.0 if y == 9 else 1.0)
    velocity = guided_velocity(model, torch.tensor([0]), null_class=9, scale=4.0, interval_start=0.2,
                               interval_end=0.6)
    x = torch.zeros(1, 2)
    assert velocity(x, torch.tensor(0.1))[0, 0] == 1.0      # before: conditional
    assert velocity(x, torch.tensor(0.4))[0, 0] == 7.0      # inside: -1 + 4 (1 + 1)
    assert velocity(x, torch.tensor(0.8))[0, 0] == 1.0      # after the end: conditional again
    assert model.seen == [[0], [0, 9], [0]]


def test_ab2_restarts_at_both_ends_of_the_guidance_interval():
    """Piecewise-constant fields: Euler is exact on the grid, AB2 must match it by restarting at each switch
    (before the fix AB2 only knew one restart time and blended the fields across the end)."""
    model = constant_model(lambda y: -1.0 if y == 9 else 1.0)
    switches = guidance_switches(4.0, 0.3, 0.7)
    assert switches == (0.3, 0.7) and guidance_switches(1.0, 0.3, 0.7) == () and guidance_switches(4.0, 0, 1) == ()
    velocity = guided_velocity(model, torch.tensor([0]), null_class=9, scale=4.0, interval_start=0.3,
                               interval_end=0.7)
    x0 = torch.zeros(1, 2)
    euler = sample_ode(velocity, x0, 10, "euler", 1.0)
    # The grid points 0.3 and 0.7 are guided (closed interval): 0.3..0.7 inclusive is 5 steps of 7, 5 of 1.
    assert euler[0, 0].item() == pytest.approx(0.5 * 1 + 0.5 * 7)
    torch.testing.assert_close(sample_ode(velocity, x0, 10, "ab2", 1.0, restart_at=switches), euler)
    assert not torch.allclose(sample_ode(velocity, x0, 10, "ab2", 1.0, restart_at=switches[:1]), euler)


def info_for(**config) -> PipelineInfo:
    return PipelineInfo(model_config=config, users=["ID_1"], user_numbers=[1], latent_mean=torch.zeros(1),
                        latent_std=torch.ones(1))


def test_sampling_checks_the_interval_and_lets_autoguidance_skip_the_null_class():
    no_null = info_for(class_dropout_prob=0.0)
    with pytest.raises(PipelineError, match="null class"):
        check_sampling(no_null, 2.0, 16, 0.3)
    check_sampling(no_null, 2.0, 16, 0.3, autoguidance=True)   # the guide is another model, not the null class
    for start, end in ((0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.2)):
        with pytest.raises(PipelineError, match="cfg_interval_start < --cfg_interval_end"):
            check_sampling(info_for(), 2.0, 16, 0.3, start, end)


#################################################################################
#                        Time-shift augmentation conditioning                   #
#################################################################################

def tiny_config(**overrides) -> dict:
    return model_config("LightningDiT-S/2", num_classes=3, input_size=4, **TINY_DIT, **overrides)


def test_time_shift_condition_is_off_by_default_and_starts_as_a_no_op():
    plain = tiny_dit(num_classes=3).eval()                            # every weight noise: adaLN-Zero hides nothing
    conditioned = LightningDiT(**tiny_config(time_shift_cond=True)).eval()   # eval: no label dropout
    assert set(conditioned.state_dict()) - set(plain.state_dict()) == {TIME_SHIFT_TABLE}
    fresh_table = conditioned.state_dict()[TIME_SHIFT_TABLE]
    assert fresh_table.shape == (4, 32) and not fresh_table.any()     # a row per latent column, zero-initialised
    conditioned.load_state_dict({**plain.state_dict(), TIME_SHIFT_TABLE: fresh_table})
    x, t, y = torch.randn(2, 32, 4, 4), torch.rand(2), torch.tensor([0, 2])
    shift = torch.tensor([1, 3])
    with torch.no_grad():
        reference = plain(x, t, y)
        torch.testing.assert_close(conditioned(x, t, y, time_shift=shift), reference, rtol=0, atol=0)
        conditioned.time_shift_embedder.weight.normal_()
        # Trained: the shift changes the prediction, and no shift means row 0, as at sampling.
        assert not torch.allclose(conditioned(x, t, y, time_shift=shift), conditioned(x, t, y))
        torch.testing.assert_close(conditioned(x, t, y), conditioned(x, t, y, time_shift=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="time_shift_cond"):
        plain(x, t, y, time_shift=shift)


def test_shift_time_rolls_each_latent_along_time_by_its_own_shift():
    x = torch.randn(3, 2, 4, 5)
    shifts = torch.tensor([0, 1, 4])
    out = shift_time(x, shifts)
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[i], torch.roll(x[i], s, dims=-1), rtol=0, atol=0)


def test_random_time_shifts_follow_the_probability():
    torch.manual_seed(0)
    assert random_time_shifts(100, 16, 0.0).eq(0).all()
    always = random_time_shifts(2000, 16, 1.0)
    assert always.min() == 1 and always.max() == 15          # a drawn shift is never the identity
    half = random_time_shifts(20000, 16, 0.5)
    assert half.ne(0).float().mean().item() == pytest.approx(0.5, abs=0.02)   # ~10 sigma of the binomial


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_training_step_trains_on_shifted_latents_told_their_shift(latent_dir, monkeypatch):
    plain = make_module(latent_dir)
    assert "time_shift_cond" not in plain.info.model_config     # off: the config (and key layout) as before
    module = make_module(latent_dir, "--time_shift_aug", "1")
    assert module.info.model_config["time_shift_cond"] is True  # recorded: stage 3 builds the same model
    seen = {}

    def recording_loss(model, x1, y, t, noise, cosine_weight=0.0, negatives=None, contrastive_weight=0.0):
        seen.update(model=model, x1=x1, t=t, noise=noise)
        return torch.zeros(len(x1), requires_grad=True)
    monkeypatch.setattr(dm, "flow_matching_loss", recording_loss)
    module.training_step(None, 0)
    shifts = seen["model"].keywords["time_shift"]
    assert isinstance(seen["model"], functools.partial) and shifts.ne(0).all()
    idx = module.batch_indices(0)
    torch.testing.assert_close(seen["x1"], shift_time(module.train_x[idx], shifts), rtol=0, atol=0)
    # t and the noise are drawn before the shifts: the same draws as a run without the augmentation.
    plain_seen = dict(seen)
    plain.training_step(None, 0)
    assert torch.equal(plain_seen["t"], seen["t"]) and torch.equal(plain_seen["noise"], seen["noise"])


def test_time_shift_aug_must_be_a_probability(latent_dir, tmp_path, capsys):
    result = run_main(capsys, S2, "--latent_dir", latent_dir, "--output_dir", tmp_path / "run", *TINY_DIT_MODEL_FLAGS,
                      "--accelerator", "cpu", "--time_shift_aug", "1.5")
    assert_user_error(result, r"--time_shift_aug: must be a finite number >= 0 and <= 1")   # checked when parsed


#################################################################################
#                A run with all three: early.ckpt, grids, time shifts           #
#################################################################################

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


#################################################################################
#                          Stage 3 with autoguidance                            #
#################################################################################

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
