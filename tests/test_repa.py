"""REPA: the target encoders (DINOv2 from the published tokenizer, checked against timm; the spectrogram CNN
trained in stage 1), the targets file beside the latents, and the alignment term in stage 2 (HASTE's stop)."""
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models.vavae as vavae_module
import stage1_extract_features
from common.io import load_safetensors
from data.repa_targets import TARGETS_FILE, to_unit_range
from data.images import load_bank
from helpers import (TINY_VAVAE, assert_user_error, make_dataset, make_tokenizer, run_main, stage1_args,
                     stage2_args)
from models.checkpoint import load_checkpoint
from models.repa_encoders import SpectrogramEncoder, dinov2_from_state_dict
from models.vavae import VAVAE
from training.repa import Projector, default_repa_depth, repa_loss, targets_on_tokens

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
PARITY = Path(__file__).parent / "data" / "dinov2_tiny_parity.safetensors"   # tests/data/make_dinov2_parity.py
QUIET = ("--tokenizer_check_images", "0")
SHORT_RUN = ("--classifier_steps", "0", "--val_identity_samples", "0", "--val_grid_users", "0")


#################################################################################
#                                 Encoders                                      #
#################################################################################

def test_dinov2_matches_timm_on_the_published_key_layout():
    """The published VA-VAE file's foundation_model.model.* in timm's layout, loaded by shape alone, gives timm's
    forward_features (class token dropped), position-grid resampling included (5x5 stored, 4x4 used).
    Same operations in the same order in float32: they agree to float32 rounding."""
    tensors = load_file(str(PARITY))
    encoder = dinov2_from_state_dict(tensors)
    assert (encoder.dim, len(encoder.blocks), encoder.blocks[0].num_heads, encoder.pos_grid) == (128, 2, 2, 5)
    with torch.no_grad():
        tokens = encoder(tensors["input"])
    reference = tensors["timm_tokens"]
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_dinov2_is_absent_from_project_tokenizers_and_names_a_wrong_layout():
    assert dinov2_from_state_dict(dict(VAVAE(**TINY_VAVAE).state_dict())) is None
    tensors = {k: v for k, v in load_file(str(PARITY)).items() if k.startswith("foundation_model.")}
    del tensors["foundation_model.model.blocks.1.ls2.gamma"]
    with pytest.raises(RuntimeError, match=r"blocks\.1\.ls2\.gamma"):
        dinov2_from_state_dict(tensors)


def test_spectrogram_encoder_features_sit_on_the_latent_grid():
    encoder = SpectrogramEncoder(num_users=3)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert encoder.features(images).shape == (2, 16, encoder.dim)      # 64 px -> 4 x 4 latent cells
    assert encoder(images).shape == (2, 3)


#################################################################################
#                              The alignment term                               #
#################################################################################

def test_targets_follow_the_time_shift_then_pool_onto_patches():
    """A target that is its latent column's index: rolled by s it reads (column - s) mod W, and a 2x2 patch holds
    the mean of its cells."""
    columns = torch.arange(4.0).repeat(4)                     # 4 x 4 grid, row-major: value = column
    targets = columns.view(1, 16, 1)
    shifted = targets_on_tokens(targets, torch.tensor([1]), token_grid=4).view(4, 4)
    assert torch.equal(shifted[0], torch.tensor([3.0, 0.0, 1.0, 2.0]))
    pooled = targets_on_tokens(targets, None, token_grid=2).view(2, 2)
    assert torch.equal(pooled, torch.tensor([[0.5, 2.5], [0.5, 2.5]]))


def test_repa_loss_is_minus_the_mean_cosine():
    projector = Projector(hidden_size=8, target_dim=8)
    tokens, other = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    with torch.no_grad():
        aligned = projector(tokens)
    assert torch.allclose(repa_loss(projector, tokens, 2.5 * aligned), -torch.ones(3))
    expected = -torch.nn.functional.cosine_similarity(aligned, other, dim=-1).mean(1)
    assert torch.allclose(repa_loss(projector, tokens, other), expected)
    assert [default_repa_depth(d) for d in (1, 4, 12, 28)] == [1, 1, 4, 9]


#################################################################################
#                         Stage 1 targets, stage 2 training                     #
#################################################################################

@pytest.fixture(scope="module")
def repa_run(tmp_path_factory):
    """Stage 1 with the spectrogram encoder, on 3 users."""
    root = tmp_path_factory.mktemp("repa")
    make_dataset(root / "data", per_user=6, val_per_user=2)
    tokenizer = make_tokenizer(root / "tok.safetensors")
    stage1_extract_features.main(stage1_args(root / "data", tokenizer, root / "latents", "--repa_encoder",
                                             "spectrogram", *QUIET))
    return root, tokenizer


def test_stage1_writes_one_target_row_per_train_latent_of_the_same_run(repa_run):
    root, _ = repa_run
    targets, meta = load_safetensors(root / "latents" / TARGETS_FILE)
    latents, train_meta = load_safetensors(root / "latents" / "train.safetensors")
    assert targets["targets"].shape == (len(latents["latents"]), 16, 96)
    assert targets["targets"].dtype == torch.float16
    assert meta["stage1_run"] == train_meta["stage1_run"] and meta["repa_encoder"] == "spectrogram"
    assert 0.0 <= float(meta["repa_encoder_val_accuracy"]) <= 1.0


def test_stage2_aligns_and_haste_from_step_0_trains_exactly_the_plain_model(repa_run, tmp_path, capsys):
    root, _ = repa_run
    latents = root / "latents"
    args = ("--max_steps", "24", "--log_every_n_steps", "1", *SHORT_RUN)
    assert run_main(capsys, "stage2_train_dit", *stage2_args(latents, tmp_path / "repa", *args,
                                                             "--repa_weight", "0.5")).returncode == 0
    rows = list(csv.DictReader(open(tmp_path / "repa/lightning_logs/csv/metrics.csv")))
    repa = [float(r["train_repa_step"]) for r in rows if r.get("train_repa_step")]
    assert len(repa) == 24 and all(-1 <= v <= 1 for v in repa)
    assert sum(repa[-6:]) / 6 < sum(repa[:6]) / 6            # the projector and the blocks learn to align
    # HASTE from step 0: the term weighs nothing, so the DiT trains exactly as without REPA.
    assert run_main(capsys, "stage2_train_dit", *stage2_args(latents, tmp_path / "stopped", *args, "--repa_weight",
                                                             "0.5", "--repa_stop_step", "0")).returncode == 0
    assert run_main(capsys, "stage2_train_dit", *stage2_args(latents, tmp_path / "plain", *args)).returncode == 0
    stopped, plain = (load_checkpoint(tmp_path / name / "checkpoints/last.ckpt")["state_dict"]
                      for name in ("stopped", "plain"))
    model_keys = [k for k in plain if k.startswith("model.")]
    assert all(torch.equal(stopped[k], plain[k]) for k in model_keys)
    assert any(k.startswith("repa_projector.") for k in stopped)
    # A resume that would drop or add the projector is refused by name.
    refused = run_main(capsys, "stage2_train_dit", *stage2_args(latents, tmp_path / "repa", "--max_steps", "30",
                                                                *SHORT_RUN))
    assert_user_error(refused, r"--repa_weight changed from 0\.5 to 0\.0")


def test_stage2_without_targets_and_stale_targets_are_refused(repa_run, tmp_path, capsys):
    root, tokenizer = repa_run
    plain = tmp_path / "plain_latents"
    stage1_extract_features.main(stage1_args(root / "data", tokenizer, plain, *QUIET))
    missing = run_main(capsys, "stage2_train_dit", *stage2_args(plain, tmp_path / "a", "--max_steps", "2",
                                                                "--repa_weight", "0.5", *SHORT_RUN))
    assert_user_error(missing, r"repa_targets\.safetensors", r"--repa_encoder")
    # Targets of another stage 1 run copied in: the run ids differ.
    (plain / TARGETS_FILE).write_bytes((root / "latents" / TARGETS_FILE).read_bytes())
    stale = run_main(capsys, "stage2_train_dit", *stage2_args(plain, tmp_path / "b", "--max_steps", "2",
                                                              "--repa_weight", "0.5", *SHORT_RUN))
    assert_user_error(stale, r"different stage 1 runs|another stage 1 run")
    # A stage 1 rerun without --repa_encoder takes the stale file away with the rest of the old run.
    stage1_extract_features.main(stage1_args(root / "data", tokenizer, plain, *QUIET))
    assert not (plain / TARGETS_FILE).exists()


def test_published_tokenizer_gives_dinov2_targets_and_project_tokenizers_refuse_dinov2(tmp_path, monkeypatch,
                                                                                       capsys):
    """--repa_encoder auto with a tokenizer file in the published layout (.pt, foundation_model.model.* inside)
    writes the DINOv2's features of each train image; --repa_encoder dinov2 with a project tokenizer exits 2."""
    monkeypatch.setitem(vavae_module.VAVAE_CONFIGS, "f16d32", TINY_VAVAE)   # the .pt layout means this config
    dinov2 = {k: v for k, v in load_file(str(PARITY)).items() if k.startswith("foundation_model.")}
    torch.manual_seed(0)
    published = tmp_path / "vavae.pt"
    torch.save({"state_dict": {**VAVAE(**TINY_VAVAE).state_dict(), **dinov2}}, published)
    data = make_dataset(tmp_path / "data", per_user=3, val_per_user=1)
    assert run_main(capsys, "stage1_extract_features", *stage1_args(
        data, published, tmp_path / "latents", "--repa_encoder", "auto", *QUIET)).returncode == 0
    targets, meta = load_safetensors(tmp_path / "latents" / TARGETS_FILE)
    assert meta["repa_encoder"] == "dinov2"
    files = [data / f for f in load_safetensors(tmp_path / "latents" / "train.safetensors")[1]["files"]]
    expected = dinov2_from_state_dict(dinov2).features(to_unit_range(load_bank(files, 64)))
    torch.testing.assert_close(targets["targets"].float(), expected.half().float())
    project = make_tokenizer(tmp_path / "tok.safetensors")
    refused = run_main(capsys, "stage1_extract_features", *stage1_args(
        data, project, tmp_path / "other", "--repa_encoder", "dinov2", *QUIET))
    assert_user_error(refused, r"carries no DINOv2", r"--repa_encoder spectrogram")
