"""The stages and the orchestrator end to end, on tiny data the tests make (ID_1, ID_2, ID_10; png and jpg;
mixed sizes and modes), a tiny tokenizer and a tiny DiT."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import parse_args
from common.io import file_sha256, load_safetensors
from data.images import read_image
from helpers import (IMAGE_SIZE, TINY_CLASSIFIER_FLAGS, TINY_DIT_MODEL_FLAGS, make_dataset, make_tokenizer,
                     run_stage, stage1_args, stage2_args)
from models.vavae import load_vavae

# Every test runs stages; one xdist worker builds the module's stage 1 + 2 fixture once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline_run")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 and a short stage 2 run shared by the tests below."""
    root = tmp_path_factory.mktemp("pipeline")
    data = make_dataset(root / "data", per_user=6, val_per_user=2)
    tokenizer = make_tokenizer(root / "tok.safetensors")
    r1 = run_stage("stage1_extract_features.py", *stage1_args(data, tokenizer, root / "latents"))
    assert r1.returncode == 0, r1.stderr
    r2 = run_stage("stage2_train_dit.py", *stage2_args(root / "latents", root / "model", "--max_epochs", "3",
                                                       "--checkpoint_every_n_steps", "2"))
    assert r2.returncode == 0, r2.stderr
    return dict(root=root, data=data, tokenizer=tokenizer, latents=root / "latents", model=root / "model",
                stage1_log=r1.stdout)


def test_stage1_writes_latents_in_user_number_order(trained):
    latents, data = trained["latents"], trained["data"]
    train, meta = load_safetensors(latents / "train.safetensors")
    assert train["latents"].shape == (18, 32, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    assert train["latents"].dtype == torch.float32 and train["user_ids"].dtype == torch.int64
    assert meta["users"] == ["ID_1", "ID_2", "ID_10"] and meta["user_numbers"] == [1, 2, 10]
    assert train["user_ids"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert meta["tokenizer_sha256"] == file_sha256(trained["tokenizer"]) and meta["image_size"] == IMAGE_SIZE
    val, _ = load_safetensors(latents / "val.safetensors")
    assert val["latents"].shape[0] == 6
    # The stored latent of ID_10's first image is the posterior mean of the preprocessed image.
    vae = load_vavae(trained["tokenizer"])
    first = sorted((data / "train" / "ID_10").iterdir())[0]
    with torch.no_grad():
        expected = vae.encode(read_image(first, IMAGE_SIZE)[0][None])[0]
    torch.testing.assert_close(train["latents"][12], expected, rtol=1e-4, atol=1e-5)
    stats, _ = load_safetensors(latents / "latent_stats.safetensors")
    assert stats["mean"].shape == stats["std"].shape == (1, 32, 1, 1)
    torch.testing.assert_close(stats["std"].flatten(), train["latents"].transpose(0, 1).flatten(1).std(1))


def test_stage1_checks_the_tokenizer_on_the_users_images(trained):
    """A random tiny tokenizer reconstructs nothing: stage 1 says so loudly, with what to do, and records it."""
    log = trained["stage1_log"]
    assert "tokenizer check: reconstruction PSNR" in log and "WARNING" in log and "--init_from" in log
    _, meta = load_safetensors(trained["latents"] / "train.safetensors")
    assert meta["tokenizer_psnr_images"] == 18 and meta["tokenizer_psnr_worst_user"] in ("ID_1", "ID_2", "ID_10")
    assert meta["tokenizer_psnr_worst_db"] <= meta["tokenizer_psnr_db"] < 24


def test_tokenizer_check_psnr_is_the_reconstruction_psnr(tmp_path, monkeypatch):
    """The reported figure is the mean per-image PSNR of encode -> decode, and a good score stays quiet."""
    import data.latents as latents
    from data.images import scan_dataset
    from models.vavae import reconstruction_psnr
    data = make_dataset(tmp_path / "d", users=("ID_1", "ID_2"), per_user=4, val_per_user=2)
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    users = scan_dataset(data, log=lambda *a: None)
    lines = []
    monkeypatch.setattr(latents, "TOKENIZER_WARN_DB", -100.0)
    result = latents.tokenizer_psnr_check(str(tok), users, IMAGE_SIZE, 4, "cpu", lines.append)
    images = torch.stack([read_image(f, IMAGE_SIZE)[0] for u in users for f in u.files["train"][::2]])
    expected = reconstruction_psnr(load_vavae(tok), images.add(1).mul(127.5).round().to(torch.uint8))
    assert result["tokenizer_psnr_images"] == 4
    assert abs(result["tokenizer_psnr_db"] - expected.mean().item()) < 0.01
    assert not any("WARNING" in line for line in lines)


def test_stage1_records_the_split(tmp_path):
    data = make_dataset(tmp_path / "flat", per_user=10)
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    r = run_stage("stage1_extract_features.py", *stage1_args(data, tok, tmp_path / "lat", "--tokenizer_check_images", 0))
    assert r.returncode == 0, r.stderr
    assert "tokenizer check" not in r.stdout
    split = json.loads((tmp_path / "lat" / "split.json").read_text())
    assert split["data_dir"] == str(data.resolve())
    for user in ("ID_1", "ID_2", "ID_10"):
        files = split["users"][user]
        assert len(files["train"]) == 8 and len(files["val"]) == 2 and not set(files["train"]) & set(files["val"])
        assert all((data / f).is_file() for f in files["train"] + files["val"])


def test_stage1_splits_unsplit_folder_80_20(tmp_path):
    data = make_dataset(tmp_path / "flat", per_user=10)
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    r = run_stage("stage1_extract_features.py", *stage1_args(data, tok, tmp_path / "lat"))
    assert r.returncode == 0, r.stderr
    assert "80/20" in r.stdout
    train, _ = load_safetensors(tmp_path / "lat" / "train.safetensors")
    val, _ = load_safetensors(tmp_path / "lat" / "val.safetensors")
    assert torch.bincount(train["user_ids"]).tolist() == [8, 8, 8]
    assert torch.bincount(val["user_ids"]).tolist() == [2, 2, 2]


def test_stage2_outputs_and_checkpoint_contents(trained):
    model = trained["model"]
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "loss_curve.png",
                 "lightning_logs/csv/metrics.csv"):
        assert (model / name).is_file(), name
    assert list((model / "lightning_logs" / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = torch.load(model / "checkpoints" / "best.ckpt", weights_only=True)
    info = ckpt["pipeline"]
    assert info["users"] == ["ID_1", "ID_2", "ID_10"] and info["user_numbers"] == [1, 2, 10]
    stats, _ = load_safetensors(trained["latents"] / "latent_stats.safetensors")
    assert torch.equal(info["latent_mean"], stats["mean"]) and torch.equal(info["latent_std"], stats["std"])
    assert info["model_config"]["num_classes"] == 3 and info["model_config"]["depth"] == 1
    # best.ckpt is for sampling: the EMA weights only (last.ckpt keeps the rest for resuming)
    last = torch.load(model / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {k for k in last["state_dict"] if k.startswith("ema.")} != set()
    metrics = (model / "lightning_logs" / "csv" / "metrics.csv").read_text()
    assert "val_loss" in metrics and "train_loss" in metrics


def test_stage3_from_checkpoint_and_tokenizer_only(trained, tmp_path):
    args = ["--dit_checkpoint", trained["model"] / "checkpoints" / "best.ckpt", "--vavae_path",
            trained["tokenizer"], "--user_ids", 10, 1, "--num_samples_per_user", 3, "--num_steps", 3,
            "--guidance_scale", 2.0, "--seed", 7]
    r = run_stage("stage3_inference.py", *args, "--output_dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["micro_doppler_grid.png"] + [f"micro_doppler_user{u:02d}_{k:03d}.png"
                                                  for u in (1, 10) for k in (1, 2, 3)]
    image = np.asarray(Image.open(tmp_path / "a" / "micro_doppler_user10_001.png"))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    grid = Image.open(tmp_path / "a" / "micro_doppler_grid.png")
    assert grid.height > 2 * 64 and grid.width > 3 * 64       # two labelled rows of three tiles
    # Same command and seed: the same bytes. Another batch size: the same noise, so the same image up to
    # float round-off in the batched matmuls.
    r = run_stage("stage3_inference.py", *args, "--output_dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    r = run_stage("stage3_inference.py", *args, "--output_dir", tmp_path / "c", "--batch_size", 1)
    assert r.returncode == 0, r.stderr
    for k in (1, 2, 3):
        name = f"micro_doppler_user10_{k:03d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        a, c = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in "ac")
        assert np.abs(a - c).max() <= 2
    assert (tmp_path / "a" / "micro_doppler_user10_001.png").read_bytes() != \
        (tmp_path / "a" / "micro_doppler_user10_002.png").read_bytes()


def test_stage2_ddp_two_processes_on_cpu(trained, tmp_path):
    r = run_stage("stage2_train_dit.py", *stage2_args(trained["latents"], tmp_path / "ddp", "--devices", 2,
                                                      "--max_epochs", 2), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    # 18 latents, batch 4 per process, 2 processes: 2 steps per epoch (1 process would take 4).
    assert ckpt["global_step"] == 4
    assert "ddp" in (r.stdout + r.stderr).lower() or "distributed" in (r.stdout + r.stderr).lower()
    # One account of the run, from global rank 0: the header once, with the world size; no warning a user cannot
    # act on (torch's broadcast_buffers deprecation, Lightning's advice to sync the epoch-level train loss).
    output = r.stdout + r.stderr
    assert output.count("parameters), 3 users") == 1 and output.count("no validation sample grids") == 1, output
    assert output.count("stage 2: 2 processes (2 per node x 1 node), batch 4 per process, 8 in total") == 1, output
    assert "broadcast_buffers" not in output and "sync_dist" not in output, output


def test_orchestrator_runs_skips_and_passes_flags(trained, tmp_path):
    out = tmp_path / "run"
    common = ["run_complete_pipeline.py", "--data_dir", trained["data"], "--vavae_path", trained["tokenizer"],
              "--output_dir", out, "--batch_size", 4, "--max_epochs", 1, "--generate_user_ids", 2,
              "--num_samples_per_user", 2, "--stages", 1, 2, 3, "--image_size", IMAGE_SIZE, *TINY_DIT_MODEL_FLAGS,
              *TINY_CLASSIFIER_FLAGS, "--precision", "32-true", "--num_steps", 2]
    r = run_stage(*common, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "generated_images").glob("*.png")) == [
        "micro_doppler_grid.png", "micro_doppler_user02_001.png", "micro_doppler_user02_002.png"]
    stage3 = json.loads((out / "generated_images" / ".stage_complete.json").read_text())["argv"]
    assert stage3[stage3.index("--num_steps") + 1] == "2"
    stage2 = json.loads((out / "trained_models" / ".stage_complete.json").read_text())["argv"]
    assert "--num_steps" not in stage2 and stage2[stage2.index("--hidden_size") + 1] == "32"
    before = (out / "generated_images" / "micro_doppler_user02_001.png").stat().st_mtime_ns
    r = run_stage(*common, timeout=400)
    assert r.returncode == 0 and r.stdout.count("already complete") == 3
    r = run_stage(*common[:-6], "--stages", 3, "--force", "--num_steps", 3, "--seed", 1, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "generated_images" / "micro_doppler_user02_001.png").stat().st_mtime_ns != before
    r = run_stage(*common, "--no_such_flag", 1)
    assert r.returncode != 0 and "--no_such_flag" in r.stderr


def test_config_file_keys_are_flags_and_flags_win(tmp_path):
    import stage2_train_dit
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 7\nlr: 0.0005\nmodel: LightningDiT-B/2\n")
    args = parse_args(stage2_train_dit.build_parser(), ["--config", str(cfg), "--latent_dir", "x",
                                                        "--output_dir", "y", "--lr", "0.001"])
    assert (args.batch_size, args.lr, args.model) == (7, 0.001, "LightningDiT-B/2")
    cfg.write_text("latent_dir: x\noutput_dir: y\nbogus_key: 1\n")
    with pytest.raises(Exception, match="bogus_key"):
        parse_args(stage2_train_dit.build_parser(), ["--config", str(cfg)])


def test_shipped_configs_are_valid():
    import stage2_train_dit
    from pipeline.orchestrate import load_config_any, ROOT
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = load_config_any(str(path))
        assert values, path
        if "model" in values:
            assert values["model"] in stage2_train_dit.build_parser()._option_string_actions["--model"].choices
