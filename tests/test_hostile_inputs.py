"""Hostile and wrong inputs: every error a user can cause ends with a message saying what to do, exit 2 and no
traceback. Bad data folders, broken and oversized images (decompression bombs), malicious pickles, model and
latent files that do not fit, stage 3 settings it cannot honour.

Most cases call a stage's main() (with its cli_entry wrapper) in-process, which is much faster than a subprocess
(a traceback there would be an uncaught exception)."""
import ast
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import PipelineError
from common.io import read_safetensors_metadata, save_safetensors
from helpers import ROOT, assert_user_error, load_ckpt, make_dataset, make_tokenizer, run_main, run_stage, stage1_args, stage2_args, write_malicious

S1, S2, S3 = "stage1_extract_features.py", "stage2_train_dit.py", "stage3_inference.py"


def _empty(root: Path) -> None:
    root.mkdir()


def _user_without_images(root: Path) -> None:
    make_dataset(root, users=("ID_2",), per_user=2)
    (root / "ID_1").mkdir()
    (root / "ID_1" / "notes.txt").write_text("no images here")


def _same_number(root: Path) -> None:
    make_dataset(root, users=("ID_3", "id03"), per_user=2)


def _train_without_val(root: Path) -> None:
    make_dataset(root / "train", users=("ID_1",), per_user=2)


@pytest.mark.parametrize("make, patterns", [
    (None, [r"--data_dir not found: .*nope", r"train/ and val/"]),
    (_empty, [r"neither train/ nor user folders with images", r"ID_1/\*\.png"]),
    (_user_without_images, [r"user folder 'ID_1' has no images", r"Add images or remove the folder"]),
    (_same_number, [r"same user number 3: 'ID_3' and 'id03'", r"Rename or merge"]),
    (_train_without_val, [r"has train/ but no val/", r"Add val/"]),
], ids=["missing", "empty", "user_without_images", "same_number", "train_without_val"])
@pytest.mark.slow
def test_stage1_bad_data_dir(tmp_path, tokenizer, capsys, make, patterns):
    root = tmp_path / "nope"
    if make:
        make(root)
        proc = run_main(capsys, S1, *stage1_args(root, tokenizer, tmp_path / "out"))
    else:   # one of them through the real script
        proc = run_stage(S1, *stage1_args(root, tokenizer, tmp_path / "out"))
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "out" / "train.safetensors").exists()


@pytest.mark.slow
def test_unnumbered_folders_are_numbered_by_sorted_name(tmp_path, tokenizer):
    from data.cli import ExtractOptions
    from data.latents import extract_features
    data = make_dataset(tmp_path / "data", users=("carol", "alice", "bob"), per_user=2)
    logged: list[str] = []
    extract_features(ExtractOptions.defaults(data_dir=str(data), vavae_path=str(tokenizer),
                                             output_path=str(tmp_path / "out"), batch_size=4, image_size=64),
                     log=logged.append)
    assert any("no number in their name" in m and "numbered 1..N by sorted folder name" in m for m in logged)
    meta = read_safetensors_metadata(tmp_path / "out" / "train.safetensors")
    assert meta["users"] == ["alice", "bob", "carol"] and meta["user_numbers"] == [1, 2, 3]


def _break(folder: Path) -> list[Path]:
    """A truncated png, a truncated jpg and a text file named .png in `folder`."""
    good_png = next(folder.glob("*.png"))
    truncated_png = folder / "truncated.png"
    truncated_png.write_bytes(good_png.read_bytes()[:200])
    buf = folder / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    buf.write_bytes(buf.read_bytes()[:300])
    fake = folder / "not_an_image.png"
    fake.write_text("this is not a png")
    return [truncated_png, buf, fake]


@pytest.mark.slow
def test_broken_images_are_skipped_named_and_counted(tmp_path, tokenizer, capsys):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3, val_per_user=2)
    broken = _break(data / "train" / "ID_1")
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in broken:
        assert re.search(rf"warning: skipping unreadable image {re.escape(str(path))}", proc.stdout), proc.stdout
    assert "6 train and 4 val latents" in proc.stdout and "3 unreadable image(s) skipped" in proc.stdout
    meta = read_safetensors_metadata(tmp_path / "out" / "train.safetensors")
    assert meta["num_skipped"] == 3


@pytest.mark.slow
def test_user_left_without_readable_images_fails(tmp_path, tokenizer, capsys):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=1, val_per_user=2)
    folder = data / "train" / "ID_2"
    _break(folder)
    for f in folder.iterdir():
        if f.name.startswith("img_"):
            f.unlink()
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out"))
    assert_user_error(proc, r"ID_2 have no readable images in train/", r"Add readable images or remove")
    assert "skipping unreadable image" in proc.stdout
    assert not list((tmp_path / "out").glob("*.safetensors"))


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A real 1-bit black PNG of width x height: a decompression bomb (20000 x 20000 is ~60 kB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)   # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _hostile(folder: Path, kind: str) -> tuple[Path, str]:
    """One hostile image in `folder`, and a pattern of the reason it must be passed over with."""
    if kind == "bomb":              # over PIL's own limit: PIL raised DecompressionBombError
        return png_of_zeros(folder / "bomb.png", 20000, 20000), r"megapixels|larger than"
    if kind == "over_limit":        # under PIL's limit (81 Mpx, decoded silently) but over ours: refused from its header
        return png_of_zeros(folder / "huge.png", 9000, 9000), r"81 megapixels\) is larger than the 33.6 megapixels"
    if kind == "truncated":
        path = folder / "truncated.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:2000])
        return path, r"\w"
    path = folder / "noise.tif"   # not an image at all
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    return path, r"\w"


HOSTILE = ["bomb", "over_limit", "truncated", "not_an_image"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_images_are_passed_over_by_every_reader(tmp_path, kind):
    """The one reader (data.images) and each consumer: stage 1's and stage 4's datasets, the tokenizer
    trainer's banks (load_bank) and stage 4's image sets name the file, say why and count it; none raises."""
    from data.images import ImageFiles, load_bank
    from evaluation.imageset import load_set
    from tokenizer.train import load_banks
    data = make_dataset(tmp_path / "data", users=("ID_1",), per_user=2, val_per_user=1)
    bad, reason = _hostile(data / "train" / "ID_1", kind)
    files = sorted((data / "train" / "ID_1").iterdir())
    reads = [ImageFiles(files, 32)[i] for i in range(len(files))]
    assert [r.image is None for r in reads] == [f == bad for f in files]
    assert re.search(reason, next(r.problem for r in reads if r.image is None)), reads
    for load in (lambda log: load_bank(files, 32, log=log), lambda log: load_set(files, [0] * 3, 32, 16, log=log).images,
                 lambda log: load_banks(data, 0.1, 32, torch.device("cpu"), log)[0]):
        logged: list[str] = []
        assert len(load(logged.append)) == 2
        assert any(f"skipping unreadable image {bad}" in m for m in logged), logged
        assert any("1 unreadable image(s) skipped" in m for m in logged), logged


@pytest.mark.parametrize("kind", ["bomb", "over_limit"])
@pytest.mark.slow
def test_stage1_passes_over_an_image_too_large(tmp_path, tokenizer, capsys, kind):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3, val_per_user=1)
    bad, reason = _hostile(data / "train" / "ID_1", kind)
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"skipping unreadable image {re.escape(str(bad))}: .*({reason})", proc.stdout), proc.stdout
    assert "6 train and 2 val latents" in proc.stdout and "1 unreadable image(s) skipped" in proc.stdout


def test_malicious_payload_is_live(tmp_path):
    """The payload used below really runs code when unpickled without weights_only (control)."""
    control = tmp_path / "control"
    torch.load(write_malicious(tmp_path / "evil.pt", control), weights_only=False)
    assert control.read_text() == "pwned"


@pytest.mark.slow
def test_malicious_pickles_are_refused_by_every_stage(tmp_path, latents, trained, tokenizer, capsys):
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "evil.pt", marker)
    out1 = tmp_path / "s1"
    assert_user_error(run_main(capsys, S1, *stage1_args(latents.parent / "data", evil, out1)),
                      r"refused", r"Nothing of it was executed", r"VA-VAE tokenizer")
    assert_user_error(run_stage(S3, "--dit_checkpoint", evil, "--vavae_path", tokenizer, "--output_dir",
                                tmp_path / "s3", "--user_ids", 1), r"refused", r"stage 2 checkpoint")
    resumed = tmp_path / "s2"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(evil, resumed / "checkpoints" / "last.ckpt")
    assert_user_error(run_main(capsys, S2, *stage2_args(latents, resumed, "--max_steps", 2)), r"refused")
    assert_user_error(run_main(capsys, S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path",
                                evil, "--output_dir", tmp_path / "s3", "--user_ids", 1), r"refused")
    assert not marker.exists()
    assert not (tmp_path / "s3").exists() or not list((tmp_path / "s3").iterdir())


def test_every_torch_load_is_weights_only():
    """Static check: every torch.load / Trainer.fit(ckpt_path=...) in the project passes weights_only=True, or
    (fit) its Trainer reads checkpoints through AtomicCheckpointIO, which always does (test_gpu_path checks it)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if any(part.startswith(".") or part in ("shared", "build", "tests") for part in rel.parts):
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            is_load = (node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                       and node.func.value.id == "torch")
            is_fit = node.func.attr == "fit" and any(k.arg == "ckpt_path" for k in node.keywords)
            if is_load or is_fit:
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords) or (is_fit and "plugins=[AtomicCheckpointIO()]" in source)
                if not safe:
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


@pytest.mark.slow
def test_tokenizer_file_errors(tmp_path, latents, trained, capsys):
    from models.vavae import VAVAE
    from helpers import TINY_VAVAE
    data = latents.parent / "data"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    other_arch = tmp_path / "other_arch.pt"   # a plain state dict: read as the published f16d32 layout
    torch.save({"state_dict": VAVAE(**TINY_VAVAE).state_dict()}, other_arch)
    cases = [
        (tmp_path / "missing.pt", [r"tokenizer \(--vavae_path\) not found: .*missing\.pt", r"Check the path"]),
        (garbage, [r"garbage\.pt", r"VA-VAE tokenizer"]),
        (trained / "checkpoints" / "last.ckpt", [r"is not a VA-VAE tokenizer", r"looks like a DiT checkpoint",
                                                 r"--dit_checkpoint"]),
        (other_arch, [r"does not match the VA-VAE", r"(missing|unexpected) keys"]),
    ]
    for path, patterns in cases:
        assert_user_error(run_main(capsys, S1, *stage1_args(data, path, tmp_path / "out")), *patterns)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dit_checkpoint_file_errors(tmp_path, tokenizer, capsys):
    """Stage 3 (and anything using load_checkpoint): missing, not a checkpoint, a tokenizer instead."""
    from models.checkpoint import load_checkpoint
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(PipelineError, match=r"stage 2 checkpoint .* not found: .*missing\.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(PipelineError, match=r"garbage\.ckpt.*stage 2 checkpoint"):
        load_checkpoint(garbage)
    proc = run_main(capsys, S3, "--dit_checkpoint", tokenizer, "--vavae_path", tokenizer, "--output_dir",
                     tmp_path / "gen", "--user_ids", 1)
    assert_user_error(proc, r"is not a stage 2 LightningDiT checkpoint \(found a VA-VAE tokenizer\)",
                      r"--dit_checkpoint .*best\.ckpt")


def latent_folder(out: Path, train=(32, 4, 4), val=(32, 4, 4), stats_channels: int = 32) -> Path:
    """A stage 1 folder of another tool (no tokenizer sha256): 12 train and 3 val latents of 3 users."""
    meta = {"users": ["ID_1", "ID_2", "ID_3"], "user_numbers": [1, 2, 3], "image_size": 64}
    for split, n, shape in (("train", 12, train), ("val", 3, val)):
        save_safetensors({"latents": torch.randn(n, *shape), "user_ids": torch.arange(n) % 3},
                         out / f"{split}.safetensors", meta)
    stats = (1, stats_channels, 1, 1)
    save_safetensors({"mean": torch.zeros(stats), "std": torch.ones(stats)}, out / "latent_stats.safetensors", meta)
    return out


@pytest.mark.parametrize("shapes, patterns", [
    (dict(train=(4, 8, 8), val=(4, 8, 8)), [r"disagree: train.safetensors holds latents \(C, h, w\) = \(4, 8, 8\)",
                                            r"mean \(1, 32, 1, 1\)", r"Rerun stage 1"]),
    (dict(val=(16, 4, 4)), [r"disagree", r"val.safetensors \(16, 4, 4\)"]),
    (dict(val=(32, 8, 8)), [r"disagree", r"val.safetensors \(32, 8, 8\)"]),
    (dict(train=(32, 4, 6), val=(32, 4, 6)), [r"latents are 4x6", r"square"]),
    (dict(train=(32, 5, 5), val=(32, 5, 5)), [r"5x5 cannot be cut into the 2x2 patches", r"patch size 1"]),
], ids=["sd_vae_latents_vavae_stats", "val_channels", "val_size", "not_square", "not_patchable"])
@pytest.mark.slow
def test_stage2_names_latent_files_that_disagree(tmp_path, capsys, shapes, patterns):
    latents = latent_folder(tmp_path / "latents", **shapes)
    proc = run_main(capsys, S2, *stage2_args(latents, tmp_path / "out", "--max_steps", 1))
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("tokenizer_config, made", [(dict(embed_dim=4, z_channels=4), "4 channels at 4x4"),
                                                     (dict(ch_mult=(1, 2, 2, 2)), "32 channels at 8x8")],
                         ids=["channels", "downsampling"])
@pytest.mark.slow
def test_a_tokenizer_that_does_not_fit_the_latents_is_named(tmp_path, trained, capsys, tokenizer_config, made):
    other = make_tokenizer(tmp_path / "other.safetensors", **tokenizer_config)
    proc = run_main(capsys, S3, "--dit_checkpoint", trained / "checkpoints" / "best.ckpt", "--vavae_path", other,
                    "--output_dir", tmp_path / "gen", "--user_ids", 1, "--num_steps", 2)
    assert_user_error(proc, rf"the tokenizer {re.escape(str(other))} makes latents of {made} from 64 px images, but "
                            r"the model of .*best.ckpt takes latents of 32 channels at 4x4", r"Pass the tokenizer used in stage 1")
    assert not list((tmp_path / "gen").glob("*.png"))
    latents = latent_folder(tmp_path / "latents")     # stage 2's validation grids decode with it too
    proc = run_main(capsys, S2, *stage2_args(latents, tmp_path / "out", "--max_steps", 1, "--vavae_path", other))
    assert_user_error(proc, rf"makes latents of {made} .* but the stage 1 latents are of 32 channels at 4x4")


@pytest.mark.slow
def test_stage3_names_a_checkpoint_whose_statistics_do_not_fit_its_model(tmp_path, trained, tokenizer, capsys):
    ckpt = load_ckpt(trained / "checkpoints" / "best.ckpt")
    ckpt["pipeline"]["latent_mean"] = torch.zeros(1, 4, 1, 1)     # statistics of another latent space
    torch.save(ckpt, tmp_path / "edited.ckpt")
    proc = run_main(capsys, S3, "--dit_checkpoint", tmp_path / "edited.ckpt", "--vavae_path", tokenizer,
                    "--output_dir", tmp_path / "gen", "--user_ids", 1, "--num_steps", 2)
    assert_user_error(proc, r"edited.ckpt disagrees with itself: its model takes latents of 32 channels",
                      r"latent mean \(1, 4, 1, 1\)")


@pytest.mark.slow
def test_stage3_unknown_user_lists_valid_ids(tmp_path, trained, tokenizer):
    proc = run_stage(S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                     "--output_dir", tmp_path / "gen", "--user_ids", 1, 99, "--num_steps", 2)
    assert_user_error(proc, r"user id\(s\) 99 were not in the training data",
                      r"Valid --user_ids: 1 \(ID_1\), 2 \(ID_2\), 10 \(ID_10\)")


@pytest.mark.slow
def test_stage3_warns_about_another_tokenizer(tmp_path, trained, tokenizer):
    import warnings
    from generation.cli import GenerateOptions
    from generation.generate import generate
    other = make_tokenizer(tmp_path / "other.safetensors", seed=1)
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    flags = dict(dit_checkpoint=ckpt, user_ids=[10], num_samples_per_user=1, num_steps=2, device="cpu")
    with pytest.warns(UserWarning, match=r"--vavae_path .*other\.safetensors is not the tokenizer the model was "
                                         r"trained with \(tok\.safetensors, sha256 [0-9a-f]{12}"):
        generate(GenerateOptions.defaults(vavae_path=str(other), output_dir=str(tmp_path / "other"), **flags),
                 log=lambda m: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(GenerateOptions.defaults(vavae_path=str(tokenizer), output_dir=str(tmp_path / "same"), **flags),
                 log=lambda m: None)
    assert not [w for w in caught if "not the tokenizer" in str(w.message)]


def _checkpoint_without_null_class(trained: Path, tmp_path: Path) -> Path:
    ckpt = load_ckpt(trained / "checkpoints" / "last.ckpt")
    ckpt["pipeline"]["model_config"]["class_dropout_prob"] = 0.0
    torch.save(ckpt, tmp_path / "no_null.ckpt")
    return tmp_path / "no_null.ckpt"


@pytest.mark.parametrize("flags, patterns", [
    (["--shift", 0], [r"--shift: must be a finite number > 0 \(got 0\)"]),
    (["--shift", -1, "--sampler", "euler"], [r"--shift: must be a finite number > 0 \(got -1\)"]),
    (["--device", "cuda"], [r"--device cuda asked for CUDA but none is available here", r"--device cpu"]),
    (["--no_null_class"], [r"--guidance_scale 4 needs the model's null class", r"--class_dropout_prob 0",
                           r"--guidance_scale 1"]),
], ids=["shift0", "shift_negative", "cuda", "no_null_class"])
@pytest.mark.slow
def test_stage3_refuses_settings_it_cannot_honour(tmp_path, trained, tokenizer, capsys, flags, patterns):
    ckpt = trained / "checkpoints" / "last.ckpt"
    if flags == ["--no_null_class"]:
        ckpt, flags = _checkpoint_without_null_class(trained, tmp_path), []
    proc = run_main(capsys, S3, "--dit_checkpoint", ckpt, "--vavae_path", tokenizer, "--output_dir",
                    tmp_path / "gen", "--user_ids", 1, "--num_steps", 2, "--guidance_scale", 4, *flags)
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "gen").exists()


@pytest.mark.slow
def test_stage3_without_null_class_runs_unguided(tmp_path, trained, tokenizer, capsys):
    proc = run_main(capsys, S3, "--dit_checkpoint", _checkpoint_without_null_class(trained, tmp_path),
                    "--vavae_path", tokenizer, "--output_dir", tmp_path / "gen", "--user_ids", 1,
                    "--num_steps", 2, "--guidance_scale", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "gen" / "micro_doppler_user01_001.png").is_file()
