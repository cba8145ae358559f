"""Demo tokenizer trainer: a tiny run writes a loadable file, the loss falls, the alignment option works."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.errors import PipelineError
from common.io import read_safetensors_metadata
from helpers import make_dataset, track_image
from models.vavae import load_vavae
from tokenizer.align import alignment_loss, build_foundation
from tokenizer.recipe import tokenizer_config
from tokenizer.cli import TokenizerOptions
from tokenizer.train import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(width=8, num_res_blocks=1, image_size=32, batch_size=4, device="cpu", eval_every=0,
            progress=False, log=lambda *a: None)
TWO_USERS = dict(users=("ID_1", "ID_2"), per_user=6, val_per_user=2, draw=track_image)
ONE_USER = dict(users=("ID_1",), per_user=4, val_per_user=1, draw=track_image)
FUNCTION_ONLY = ("foundation", "max_val_images", "log_every", "progress", "log")   # train_tokenizer's, not flags


def run_trainer(data_dir, output_path, **kwargs) -> dict:
    """train_tokenizer with flags given as keywords over the parser's defaults; its own keywords pass through."""
    own = {k: kwargs.pop(k) for k in FUNCTION_ONLY if k in kwargs}
    return train_tokenizer(TokenizerOptions.defaults(data_dir=data_dir, output_path=output_path, **kwargs), **own)


def test_tiny_run_writes_a_loadable_tokenizer(tmp_path):
    data = make_dataset(tmp_path / "data", **TWO_USERS)
    out = tmp_path / "tok.safetensors"
    summary = run_trainer(data, out, steps=3, **TINY)
    model = load_vavae(out)
    assert model.config == tokenizer_config(8, 1, 32)
    meta = read_safetensors_metadata(out)
    assert meta["kind"] == "vavae" and meta["num_train_images"] == 12 and meta["num_val_images"] == 4
    assert meta["steps"] == 3 and meta["storage_dtype"] == "float16" and meta["align"] == "off"
    assert meta["val_psnr_db"] == round(summary["val_psnr_db"], 3)     # the metadata keeps 3 decimals
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 2, 2)


def test_loss_decreases_on_a_fixed_set(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    summary = run_trainer(data, tmp_path / "tok.safetensors", steps=30, lr=2e-3, warmup=3, log_every=1,
                              **{**TINY, "width": 16})
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_alignment_with_a_custom_feature_extractor(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    factory = lambda: nn.Sequential(nn.Conv2d(3, 12, 4, stride=4), nn.ReLU(), nn.Conv2d(12, 24, 2, stride=2))
    summary = run_trainer(data, tmp_path / "tok.safetensors", steps=4, log_every=1, foundation=factory, **TINY)
    last = summary["history"][-1]
    assert {"vf_cos", "vf_dist", "vf_scale"} <= set(last) and all(math.isfinite(v) for v in last.values())
    assert read_safetensors_metadata(tmp_path / "tok.safetensors")["align"] == "custom"
    assert not any(k.startswith("linear_proj") for k in load_vavae(tmp_path / "tok.safetensors").state_dict())


def test_alignment_from_a_local_torchvision_vit_file(tmp_path):
    from torchvision.models import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    fm = build_foundation(tmp_path / "vit.pt")
    assert fm(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 4, 4)     # resized to the ViT's own input size
    data = make_dataset(tmp_path / "data", **ONE_USER)
    lines = []
    run_trainer(data, tmp_path / "tok.safetensors", steps=2, align_weights=tmp_path / "vit.pt",
                    **{**TINY, "log": lines.append})
    assert any("alignment term on" in line for line in lines)
    assert read_safetensors_metadata(tmp_path / "tok.safetensors")["align"] == "vit.pt"


def test_foundation_resnet_file_gives_stride_16_features(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet
    torch.save(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).state_dict(), tmp_path / "r.pt")
    fm = build_foundation(tmp_path / "r.pt")
    assert fm(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    assert not any(p.requires_grad for p in fm.parameters())


def test_alignment_loss_is_zero_for_identical_features():
    z = torch.randn(2, 8, 4, 4)
    mcos, mdms = alignment_loss(z, nn.Identity(), z.clone())
    assert mcos.item() == 0 and mdms.item() == 0


def test_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        run_trainer(tmp_path / "missing", tmp_path / "t.safetensors", steps=1, **TINY)
    with pytest.raises(PipelineError, match="multiple of 8"):
        tokenizer_config(width=12)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PipelineError):
        build_foundation(tmp_path / "junk.pt")


def test_fine_tuning_from_a_tokenizer_reports_psnr_before_and_after(tmp_path):
    data = make_dataset(tmp_path / "data", **{**ONE_USER, "val_per_user": 2})
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=2, **TINY)
    lines = []
    out = tmp_path / "tuned.safetensors"
    summary = run_trainer(data, out, steps=6, lr=2e-3, warmup=1, init_from=start,
                              **{**TINY, "width": 16, "log": lines.append})
    # PSNR "before" is the start file's own PSNR on the same held-out images: the file's metadata scores the fp16
    # weights the file holds, so the two are the same computation and agree exactly (the metadata keeps 3
    # decimals). The architecture is the file's.
    assert round(summary["val_psnr_before_db"], 3) == read_safetensors_metadata(start)["val_psnr_db"]
    assert load_vavae(out).config == load_vavae(start).config          # --width 16 does not apply
    meta = read_safetensors_metadata(out)
    assert meta["init_from"] == "start.safetensors" and meta["decoder_only"] is False
    assert meta["crop_size"] == 32 and meta["batch_size"] == 4    # full frames; TINY's batch wins over the recipe's 8
    assert any("before fine-tuning" in line for line in lines)


def test_decoder_only_keeps_the_encoder_bit_identical(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=1, **TINY)
    out = tmp_path / "tuned.safetensors"
    run_trainer(data, out, steps=4, lr=2e-3, warmup=1, init_from=start, decoder_only=True, **TINY)
    before, after = load_vavae(start).state_dict(), load_vavae(out).state_dict()
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in moved)
    with pytest.raises(PipelineError, match="--init_from"):
        run_trainer(data, out, steps=1, decoder_only=True, **TINY)


def test_random_crops_are_grid_aligned_windows_of_each_image():
    from tokenizer.train import random_crops
    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.int64).reshape(2, 3, 64, 64)
    crops = random_crops(images, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 32, 32)
    for image, crop in zip(images, crops):
        y, x = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 64)
        assert y % 16 == 0 and x % 16 == 0 and torch.equal(crop, image[:, y:y + 32, x:x + 32])
    assert random_crops(images, 64, torch.Generator()) is images


def test_crop_training_runs_and_measures_full_images(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    summary = run_trainer(data, tmp_path / "tok.safetensors", steps=2, crop_size=16, **TINY)
    assert math.isfinite(summary["val_psnr_db"])
    meta = read_safetensors_metadata(tmp_path / "tok.safetensors")
    assert meta["crop_size"] == 16 and meta["lr"] == 6e-4        # from-scratch defaults
    finetune = run_trainer(data, tmp_path / "f.safetensors", steps=1, init_from=tmp_path / "tok.safetensors",
                               **{**TINY, "batch_size": None})
    assert read_safetensors_metadata(tmp_path / "f.safetensors")["batch_size"] == 8 and finetune["steps"] == 1
    with pytest.raises(PipelineError, match="--crop_size"):
        run_trainer(data, tmp_path / "t.safetensors", steps=1, crop_size=24, **TINY)


def test_output_path_is_required(tmp_path, capsys, monkeypatch):
    """Without it the trainer used to write assets/demo_vavae.safetensors (relative to the working folder:
    from the repository, over the shipped demo tokenizer). Run from tmp_path, so that nothing else is at risk."""
    import train_tokenizer
    data = make_dataset(tmp_path / "data", **TWO_USERS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_tokenizer.main(["--data_dir", str(data), "--steps", "1", "--width", "8", "--image_size", "32",
                              "--batch_size", "2", "--eval_every", "0", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--output_path" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.safetensors"))


def test_gan_fine_tune_keeps_the_encoder_and_switches_the_gan_on_after_the_warm_up(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=1, **TINY)
    out = tmp_path / "tuned.safetensors"
    summary = run_trainer(data, out, steps=5, lr=2e-3, warmup=1, init_from=start, decoder_only=True,
                              disc_weight=0.5, disc_start=2, disc_lr=1e-3, log_every=1, **TINY)
    history = summary["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert all("d_loss" in h and "d_acc" in h for h in history)           # the discriminator trains from step 1
    assert not any("g_loss" in h for h in history[:2])                      # the decoder's GAN term after step 2
    assert all(h["d_weight"] > 0 and math.isfinite(h["g_loss"]) for h in history[2:])
    before, after = load_vavae(start).state_dict(), load_vavae(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    meta = read_safetensors_metadata(out)
    assert meta["disc_weight"] == 0.5 and meta["disc_start"] == 2 and meta["disc_lr"] == 1e-3
    assert meta["disc"] == "fresh" and meta["loss"].endswith("+ 0.5 adaptive hinge-gan after step 2")
    assert "perceptual_weight" not in meta and "lpips" not in meta["loss"]


def test_fine_tune_reuses_lpips_and_discriminator_kept_under_loss_in_the_starting_file(tmp_path):
    """As the published VA-VAE keeps them: `loss.perceptual_loss.*` and `loss.discriminator.*` beside the
    tokenizer's weights; the fine-tune uses both and downloads nothing."""
    from common.io import load_safetensors, save_safetensors
    from test_tokenizer_losses import fake_lpips_state_dict
    from tokenizer.losses import PatchDiscriminator
    data = make_dataset(tmp_path / "data", **ONE_USER)
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=1, **TINY)
    tensors, meta = load_safetensors(start)
    tensors |= {f"loss.perceptual_loss.{k}": v for k, v in fake_lpips_state_dict().items()}
    tensors |= {f"loss.discriminator.{k}": v for k, v in PatchDiscriminator(ndf=8).state_dict().items()}
    save_safetensors(tensors, start, meta)
    lines = []
    summary = run_trainer(data, tmp_path / "tuned.safetensors", steps=2, init_from=start, decoder_only=True,
                              perceptual_weight=1.0, disc_weight=0.5, disc_start=0, log_every=1,
                              **{**TINY, "log": lines.append})
    assert all(h["lpips"] > 0 and "g_loss" in h for h in summary["history"])
    meta = read_safetensors_metadata(tmp_path / "tuned.safetensors")
    assert meta["lpips"] == "start.safetensors:loss.perceptual_loss" and meta["perceptual_weight"] == 1.0
    assert meta["disc"] == "start.safetensors:loss.discriminator"
    assert " + 1.0 lpips + 0.5 adaptive hinge-gan" in meta["loss"]
    assert any("reused from" in line for line in lines)


def test_texture_term_errors(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=1, **TINY)
    with pytest.raises(PipelineError, match="--lpips_vgg"):         # the demo tokenizer holds no VGG-16
        run_trainer(data, tmp_path / "t.safetensors", steps=1, init_from=start, perceptual_weight=1.0, **TINY)
    with pytest.raises(PipelineError, match="at least 32 px"):
        run_trainer(data, tmp_path / "t.safetensors", steps=1, crop_size=16, disc_weight=0.5, **TINY)
    with pytest.raises(PipelineError, match=">= 0"):
        run_trainer(data, tmp_path / "t.safetensors", steps=1, disc_weight=-1.0, **TINY)
    assert not (tmp_path / "t.safetensors").exists()


def test_gan_flags_run_a_decoder_only_fine_tune_end_to_end(tmp_path):
    import train_tokenizer as script
    data = make_dataset(tmp_path / "data", **ONE_USER)
    start = tmp_path / "start.safetensors"
    run_trainer(data, start, steps=1, **TINY)
    out = tmp_path / "tuned.safetensors"
    script.main(["--data_dir", str(data), "--output_path", str(out), "--init_from", str(start), "--decoder_only",
                 "--steps", "3", "--batch_size", "4", "--image_size", "32", "--eval_every", "0", "--device", "cpu",
                 "--disc_weight", "0.25", "--disc_start", "1", "--disc_lr", "2e-4"])
    meta = read_safetensors_metadata(out)
    assert meta["steps"] == 3 and meta["decoder_only"] is True
    assert (meta["disc_weight"], meta["disc_start"], meta["disc_lr"]) == (0.25, 1, 2e-4)
    assert math.isfinite(meta["val_psnr_db"])


#################################################################################
#                     Early stopping on held-out PSNR                            #
#################################################################################

# Early stopping at tiny size: an evaluation every step and a high constant-ish lr (2e-2, no warm-up) whose
# held-out PSNR swings from step to step, so that with min_delta 0 a plateau (two evaluations below the best)
# comes within a few steps; fp32, so that the trajectory does not depend on the CPU's bf16 support.
EARLY = dict(TINY, eval_every=1, lr=2e-2, warmup=0, precision="32-true", log_every=1)


def val_images(data):
    """The held-out images the trainer scores (4 here: its eval bank is every val image)."""
    from tokenizer.train import load_banks
    return load_banks(data, 0.1, 32, torch.device("cpu"), log=lambda *a: None)[1]


def stored_psnr(path, images) -> float:
    """Mean PSNR (dB) of the tokenizer file at `path` over uint8 `images`, scored as the trainer scores (in its
    NCHW layout: channels_last convolutions round in another order, ~1e-5 dB apart)."""
    from tokenizer.train import mean_reconstruction_psnr
    return mean_reconstruction_psnr(load_vavae(path, memory_format=torch.contiguous_format), images)


def test_early_stopping_counts_evaluations_without_progress_and_keeps_the_best():
    from tokenizer.early_stopping import EarlyStopping
    stop = EarlyStopping(patience=2, min_delta_db=0.1, floor_db=24.0)
    # 24.55 is the best, but not progress (0.05 dB over 24.5): the plateau counts from step 20
    decisions = [stop.update(step, db, {"w": torch.tensor(db)}) for step, db in
                 [(10, 20.0), (20, 24.5), (30, 24.55), (40, 24.3)]]
    assert decisions == [False, False, False, True]
    assert (stop.best_step, stop.best_db, stop.best_state["w"].item()) == (30, 24.55, pytest.approx(24.55))
    assert (stop.reference_step, stop.wait) == (20, 2)
    assert "has not risen by more than 0.1 dB over 24.50 dB (step 20) for 2 evaluations; keeping step 30's " \
           "weights (24.55 dB)" in stop.stop_message(40, 24.3)
    # below the floor a plateau does not stop, said once; a later rise above it does
    low = EarlyStopping(patience=1, min_delta_db=0.1, floor_db=24.0)
    assert [low.update(s, db, {}) for s, db in [(1, 20.0), (2, 20.05)]] == [False, False]
    assert "below the 24 dB floor" in low.below_floor_note() and low.below_floor_note() is None
    assert [low.update(s, db, {}) for s, db in [(3, 24.2), (4, 24.25)]] == [False, True]
    assert not EarlyStopping(patience=0, min_delta_db=0.1, floor_db=0).update(1, 30.0, {})


@pytest.mark.slow
def test_a_plateau_stops_the_run_and_the_file_holds_the_best_scored_weights(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", **TWO_USERS)
    out, lines = tmp_path / "tok.safetensors", []
    summary = run_trainer(data, out, steps=40, early_stop_patience=2, early_stop_min_delta_db=0.0,
                          early_stop_floor_db=0.0, **{**EARLY, "progress": True, "log": lines.append})
    evals = dict(summary["evals"])
    best_step = max(evals, key=evals.get)
    assert summary["stopped"] == "plateau" and summary["steps"] < 40
    assert list(evals) == list(range(1, summary["steps"] + 1))
    # with min_delta 0 the plateau is two evaluations below the best: the last weights are not the ones kept
    assert summary["kept_step"] == best_step == summary["steps"] - 2
    meta = read_safetensors_metadata(out)
    assert (meta["stopped"], meta["kept_step"], meta["steps"]) == ("plateau", best_step, summary["steps"])
    assert meta["early_stop_patience"] == 2 and meta["eval_images"] == 4 and meta["eval_every"] == 1
    # the file's PSNR is the best evaluation's: it was scored as stored (fp16), on the same images
    assert meta["val_psnr_db"] == meta["kept_eval_psnr_db"] == round(evals[best_step], 3)
    assert stored_psnr(out, val_images(data)) == pytest.approx(evals[best_step], abs=1e-9)
    assert stored_psnr(out, val_images(data)) > evals[summary["steps"]]
    assert any(line.startswith(f"early stop at step {summary['steps']}: held-out PSNR") and
               f"keeping step {best_step}'s weights ({evals[best_step]:.2f} dB)" in line for line in lines)
    progress_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenizer: ")]
    assert progress_lines and all("/up to 40 step" in line for line in progress_lines)


@pytest.mark.slow
def test_early_stopping_never_stops_below_the_floor_and_leaves_the_schedule_alone(tmp_path):
    data = make_dataset(tmp_path / "data", **TWO_USERS)
    plain = run_trainer(data, tmp_path / "plain.safetensors", steps=8, **EARLY)
    lines = []
    # no rise counts as progress (50 dB), so every evaluation after the first is a plateau, all below the floor
    floored = run_trainer(data, tmp_path / "floored.safetensors", steps=8, early_stop_patience=1,
                          early_stop_min_delta_db=50.0, early_stop_floor_db=100.0, **{**EARLY, "log": lines.append})
    assert floored["steps"] == 8 and floored["stopped"] == "steps"
    assert any("below the 100 dB floor" in line for line in lines)
    # the same steps at the same learning rates: early stopping only ends a run, the cosine runs over the caps
    assert floored["history"] == plain["history"]
    evals = dict(floored["evals"])
    assert list(evals) == list(range(1, 9))                # the last step is scored too, and competes
    best_step = max(evals, key=evals.get)
    meta = read_safetensors_metadata(tmp_path / "floored.safetensors")
    assert (meta["stopped"], meta["kept_step"], meta["val_psnr_db"]) == ("steps", best_step, round(evals[best_step], 3))
    assert any(f"keeping step {best_step}'s weights, the best of 8 evaluations" in line for line in lines)


@pytest.mark.slow
def test_patience_0_trains_every_step_and_keeps_the_last_weights(tmp_path):
    data = make_dataset(tmp_path / "data", **TWO_USERS)
    evaluated = run_trainer(data, tmp_path / "evaluated.safetensors", steps=6, early_stop_patience=0,
                            early_stop_min_delta_db=5.0, **{**EARLY, "eval_every": 2})
    silent = run_trainer(data, tmp_path / "silent.safetensors", steps=6, **{**EARLY, "eval_every": 0})
    assert (evaluated["steps"], evaluated["stopped"], evaluated["kept_step"]) == (6, "steps", 6)
    assert [step for step, _ in evaluated["evals"]] == [2, 4]        # the last step is scored on every val image
    # evaluations change nothing: both files hold the weights of step 6, as before early stopping existed
    a, b = (load_vavae(tmp_path / f"{name}.safetensors").state_dict() for name in ("evaluated", "silent"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = read_safetensors_metadata(tmp_path / "evaluated.safetensors")
    assert meta["stopped"] == "steps" and "early_stop_patience" not in meta


def test_early_stopping_needs_evaluations(tmp_path):
    data = make_dataset(tmp_path / "data", **ONE_USER)
    with pytest.raises(PipelineError, match="--eval_every"):
        run_trainer(data, tmp_path / "t.safetensors", steps=1, early_stop_patience=3, **TINY)
    assert not (tmp_path / "t.safetensors").exists()
