"""Nothing lost, nothing run that shouldn't: bad input, interruption, unsafe files.

Errors a user causes must end with a message on stderr (what was wrong, what to do), exit code 2 and no
traceback. A few cases run the real stage scripts as subprocesses; the others call the same main() (with
its cli_entry wrapper) in-process, which is much faster (a traceback there would be an uncaught exception).
"""
import argparse
import ast
import csv
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import PipelineError
from common.io import load_safetensors, read_safetensors_metadata, save_safetensors
from helpers import (PYTHON, ROOT, TINY_DIT, TINY_PRECISION, assert_user_error, make_dataset, make_tokenizer,
                     run_main, run_stage, stage1_args, stage2_args, write_malicious)
from training.divergence import NONFINITE_CHECK_EVERY

pytestmark = pytest.mark.slow   # stages, kill -9 and resumes on a trained run

S1, S2, S3 = "stage1_extract_features.py", "stage2_train_dit.py", "stage3_inference.py"
STEPS, EVERY = 60, 5     # the reference run: 60 steps, last.ckpt every 5


#################################################################################
#                                   Fixtures                                    #
#################################################################################

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def tokenizer(ws) -> Path:
    return make_tokenizer(ws / "tok.safetensors")


@pytest.fixture(scope="module")
def latents(ws, tokenizer) -> Path:
    data = make_dataset(ws / "data")
    proc = run_stage(S1, *stage1_args(data, tokenizer, ws / "latents"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws / "latents"


def stage2_command(latents: Path, out: Path, *extra) -> list[str]:
    """60 steps, last.ckpt every 5. No validation (it also writes last.ckpt, at epoch ends, after the EMA
    update), so that a resume starts from a mid-step checkpoint, where the EMA update was once missed."""
    return [PYTHON, S2, *stage2_args(latents, out, "--max_steps", STEPS, "--checkpoint_every_n_steps", EVERY,
                                     "--log_every_n_steps", 1, "--val_every_n_epochs", 1000, *extra)]


@pytest.fixture(scope="module")
def trained(ws, latents) -> Path:
    """An uninterrupted stage 2 run (also the reference for the kill -9 test)."""
    out = ws / "trained"
    proc = subprocess.run(stage2_command(latents, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


#################################################################################
#                             Stage 1: bad folders                              #
#################################################################################

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
def test_stage1_bad_data_dir(tmp_path, tokenizer, capsys, make, patterns):
    root = tmp_path / "nope"
    if make:
        make(root)
        proc = run_main(capsys, S1, *stage1_args(root, tokenizer, tmp_path / "out"))
    else:   # one of them through the real script
        proc = run_stage(S1, *stage1_args(root, tokenizer, tmp_path / "out"))
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "out" / "train.safetensors").exists()


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


#################################################################################
#                            Stage 1: broken images                             #
#################################################################################

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
def test_stage1_passes_over_an_image_too_large(tmp_path, tokenizer, capsys, kind):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3, val_per_user=1)
    bad, reason = _hostile(data / "train" / "ID_1", kind)
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"skipping unreadable image {re.escape(str(bad))}: .*({reason})", proc.stdout), proc.stdout
    assert "6 train and 2 val latents" in proc.stdout and "1 unreadable image(s) skipped" in proc.stdout


#################################################################################
#                            Two runs into one place                            #
#################################################################################

def hold_lock(path: Path, what: str) -> subprocess.Popen:
    """Another process holding the lock `path` through common.lock, as a running command does."""
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from common.lock import run_lock\n"
                               f"with run_lock({str(path)!r}, {what!r}, 'elsewhere'):\n"
                               "    print('held', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _lock_cases(tmp_path: Path, tokenizer: Path, trained: Path):
    """(command and flags, its lock file) of every command that writes an output."""
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    out = tmp_path / "out"
    return {
        "stage1": ([S1, *stage1_args(data, tokenizer, out)], out / "stage1.lock"),
        "stage3": ([S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                    "--output_dir", out, "--user_ids", 1, "--num_steps", 2], out / "stage3.lock"),
        "stage4": (["stage4_evaluate.py", "--data_dir", data, "--generated_dir", out, "--output_dir", out],
                   out / "stage4.lock"),
        "tokenizer": (["train_tokenizer.py", "--data_dir", data, "--output_path", out / "tok.safetensors",
                       "--steps", 1], out / "tok.safetensors.lock"),
        "pipeline": (["run_complete_pipeline.py", "--data_dir", data, "--vavae_path", tokenizer, "--output_dir", out],
                     out / "pipeline.lock"),
    }


@pytest.mark.parametrize("command", ["stage1", "stage3", "stage4", "tokenizer", "pipeline"])
def test_a_second_run_into_the_same_output_is_refused_naming_the_first(tmp_path, tokenizer, trained, capsys, command):
    (script, *flags), lock = _lock_cases(tmp_path, tokenizer, trained)[command]
    holder = hold_lock(lock, "the first run")
    try:
        proc = run_main(capsys, script, *flags)
        assert_user_error(proc, rf"another the first run run \(pid {holder.pid} on {re.escape(socket.gethostname())}, "
                                r"started \d{4}-\d\d-\d\d \d\d:\d\d", r"Wait for it to finish")
        assert sorted(p.name for p in lock.parent.iterdir()) == [lock.name]   # the first run's output untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, tokenizer, capsys):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stage1.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                             "started": "then", "what": "stage 1"}))
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out", "--tokenizer_check_images", 0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"left by stage 1 process {dead.pid}" in proc.stdout and not (tmp_path / "out" / "stage1.lock").exists()


def test_two_pipelines_into_one_folder_the_second_is_refused_the_first_finishes(tmp_path, tokenizer, capsys):
    """The issue's case: the same command started twice; the second stops at once, the first is untouched."""
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    out = tmp_path / "out"
    command = ["run_complete_pipeline.py", "--data_dir", data, "--vavae_path", tokenizer, "--output_dir", out,
               "--stages", 1, "--image_size", 64, "--batch_size", 4, "--num_workers", 0]
    first = subprocess.Popen([PYTHON, *map(str, command)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 60
        while not (out / "pipeline.lock").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = run_main(capsys, *command)
        assert_user_error(second, rf"another pipeline run \(pid {first.pid} on ", r"another --output_dir")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "mixes the files" not in stderr and (out / "latent_features" / ".stage_complete.json").is_file()
    assert not (out / "pipeline.lock").exists()


#################################################################################
#                      Wrong, broken and unsafe model files                     #
#################################################################################

def test_malicious_payload_is_live(tmp_path):
    """The payload used below really runs code when unpickled without weights_only (control)."""
    control = tmp_path / "control"
    torch.load(write_malicious(tmp_path / "evil.pt", control), weights_only=False)
    assert control.read_text() == "pwned"


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
def test_resume_on_other_latents_is_refused(tmp_path, latents, trained, capsys, change, pattern):
    """Stage 1 redone (other images, another tokenizer): resuming would mix the two runs."""
    out, other = tmp_path / "run", tmp_path / "latents"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    shutil.copytree(latents, other)
    change(other)
    proc = run_main(capsys, S2, *stage2_args(other, out, "--max_steps", STEPS + 2))
    assert_user_error(proc, r"last\.ckpt was trained on other stage 1 latents", pattern, r"--restart")


def test_restart_trains_anew_and_removes_the_stale_best(tmp_path, latents, trained):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "checkpoints" / "best.ckpt")   # the old run's best
    assert load_ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    # The new run validates only its final weights (step 4): best.ckpt is the new run's.
    best = _train_in_process(latents, out, "--restart", "--max_steps", 4, "--checkpoint_every_n_steps", 2,
                             "--val_every_n_epochs", 1000)
    assert best == out / "checkpoints" / "best.ckpt" and load_ckpt(best)["global_step"] == 4
    assert load_ckpt(out / "checkpoints" / "last.ckpt")["global_step"] == 4


#################################################################################
#                                   Stage 3                                     #
#################################################################################

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
def test_stage2_names_latent_files_that_disagree(tmp_path, capsys, shapes, patterns):
    latents = latent_folder(tmp_path / "latents", **shapes)
    proc = run_main(capsys, S2, *stage2_args(latents, tmp_path / "out", "--max_steps", 1))
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("tokenizer_config, made", [(dict(embed_dim=4, z_channels=4), "4 channels at 4x4"),
                                                     (dict(ch_mult=(1, 2, 2, 2)), "32 channels at 8x8")],
                         ids=["channels", "downsampling"])
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


def test_stage3_names_a_checkpoint_whose_statistics_do_not_fit_its_model(tmp_path, trained, tokenizer, capsys):
    ckpt = load_ckpt(trained / "checkpoints" / "best.ckpt")
    ckpt["pipeline"]["latent_mean"] = torch.zeros(1, 4, 1, 1)     # statistics of another latent space
    torch.save(ckpt, tmp_path / "edited.ckpt")
    proc = run_main(capsys, S3, "--dit_checkpoint", tmp_path / "edited.ckpt", "--vavae_path", tokenizer,
                    "--output_dir", tmp_path / "gen", "--user_ids", 1, "--num_steps", 2)
    assert_user_error(proc, r"edited.ckpt disagrees with itself: its model takes latents of 32 channels",
                      r"latent mean \(1, 4, 1, 1\)")


def test_stage3_unknown_user_lists_valid_ids(tmp_path, trained, tokenizer):
    proc = run_stage(S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                     "--output_dir", tmp_path / "gen", "--user_ids", 1, 99, "--num_steps", 2)
    assert_user_error(proc, r"user id\(s\) 99 were not in the training data",
                      r"Valid --user_ids: 1 \(ID_1\), 2 \(ID_2\), 10 \(ID_10\)")


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


def test_stage3_rerun_leaves_only_this_runs_samples(tmp_path, trained, tokenizer):
    from generation.cli import GenerateOptions
    from generation.generate import generate
    ckpt, out = str(trained / "checkpoints" / "last.ckpt"), tmp_path / "gen"
    flags = dict(dit_checkpoint=ckpt, vavae_path=str(tokenizer), output_dir=str(out), num_steps=2, device="cpu")
    generate(GenerateOptions.defaults(user_ids=[1, 10], num_samples_per_user=2, **flags), log=lambda m: None)
    mine = ["notes.txt", "micro_doppler_user01_001.jpg", "my_micro_doppler_user01_001.png"]
    for name in mine:                          # the user's own files, not of the project's naming
        (out / name).write_text("keep me")
    logged = []
    generate(GenerateOptions.defaults(user_ids=[2], num_samples_per_user=1, **flags), log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["micro_doppler_grid.png", "micro_doppler_user02_001.png", *mine])
    assert "removed 4 sample(s) of an earlier run" in logged[-1]


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
def test_stage3_refuses_settings_it_cannot_honour(tmp_path, trained, tokenizer, capsys, flags, patterns):
    ckpt = trained / "checkpoints" / "last.ckpt"
    if flags == ["--no_null_class"]:
        ckpt, flags = _checkpoint_without_null_class(trained, tmp_path), []
    proc = run_main(capsys, S3, "--dit_checkpoint", ckpt, "--vavae_path", tokenizer, "--output_dir",
                    tmp_path / "gen", "--user_ids", 1, "--num_steps", 2, "--guidance_scale", 4, *flags)
    assert_user_error(proc, *patterns)
    assert not (tmp_path / "gen").exists()


def test_stage3_without_null_class_runs_unguided(tmp_path, trained, tokenizer, capsys):
    proc = run_main(capsys, S3, "--dit_checkpoint", _checkpoint_without_null_class(trained, tmp_path),
                    "--vavae_path", tokenizer, "--output_dir", tmp_path / "gen", "--user_ids", 1,
                    "--num_steps", 2, "--guidance_scale", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "gen" / "micro_doppler_user01_001.png").is_file()


def test_noise_is_independent_per_seed_user_and_sample(monkeypatch):
    """seed * 1_000_003 + user * 1000 + sample made (user 1, sample 1000) the same draw as (user 2, sample 0)."""
    import generation.generate as gen
    from models.lightningdit import LightningDiT, model_config
    from models.checkpoint import PipelineInfo
    config = model_config("LightningDiT-S/2", num_classes=3, input_size=4, **TINY_DIT)
    model = LightningDiT(**config).eval()
    info = PipelineInfo(model_config=config, users=["ID_1", "ID_2", "ID_10"], user_numbers=[1, 2, 10],
                        latent_mean=torch.zeros(1, 32, 1, 1), latent_std=torch.ones(1, 32, 1, 1))
    seen = {}

    def noise_as_output(velocity, x0, *args, **kwargs):
        seen.update(x0=x0.clone(), restart_at=kwargs.get("restart_at"))
        return x0
    monkeypatch.setattr(gen, "sample_ode", noise_as_output)
    vae = argparse.Namespace(decode=lambda z: z[:, :3])
    gen.sample_images(model, vae, info, [(1, 1000), (2, 0)], guidance_scale=4.0, cfg_interval_start=0.3,
                      progress=False)
    assert not torch.equal(seen["x0"][0], seen["x0"][1])
    assert seen["restart_at"] == (0.3,)           # AB2 restarts where guidance switches on
    gen.sample_images(model, vae, info, [(1, 0)], guidance_scale=1.0, cfg_interval_start=0.3, progress=False)
    assert seen["restart_at"] == ()               # no guidance, no switch
    # Many triples, no two alike (the first values of each draw stand for the whole draw).
    firsts = {tuple(gen.job_noise(seed, u, k, (3,)).tolist()) for seed in (0, 1) for u in (1, 2, 3)
              for k in range(1500)}
    assert len(firsts) == 2 * 3 * 1500


#################################################################################
#                                Atomic outputs                                 #
#################################################################################

def test_interrupted_write_leaves_no_final_file(tmp_path, monkeypatch):
    import common.io
    target = tmp_path / "sub" / "train.safetensors"

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.io, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"x": torch.zeros(3)}, target)
    assert not target.exists() and not list(target.parent.iterdir())   # no temporary file left either
    monkeypatch.undo()
    save_safetensors({"x": torch.zeros(3)}, target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_interrupted_stage1_is_not_finished_work(tmp_path, tokenizer, monkeypatch):
    import data.latents as latents_mod
    from data.cli import ExtractOptions
    real = latents_mod.encode_all

    def dies_on_val(*args, **kwargs):
        if args[-1] == "stage 1 val":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(latents_mod, "encode_all", dies_on_val)
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3)
    with pytest.raises(KeyboardInterrupt):
        latents_mod.extract_features(ExtractOptions.defaults(data_dir=str(data), vavae_path=str(tokenizer),
                                                             output_path=str(tmp_path / "out"), batch_size=4,
                                                             image_size=64), log=lambda m: None)
    assert not (tmp_path / "out" / "val.safetensors").exists()
    assert not (tmp_path / "out" / "latent_stats.safetensors").exists()


def test_stage3_killed_while_moving_its_samples_in_is_detected(tmp_path, trained, tokenizer, monkeypatch, capsys):
    """Stage 3 and stage 1 share one staged write (common.io.replaced_together): a kill between two of its
    renames leaves a marker that stage 4 refuses, naming stage 3."""
    import common.io
    real, moved = os.replace, []

    def killed_after_the_first_sample(src, dst):
        if Path(src).parent.name == common.io.STAGING_DIR:
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(common.io.os, "replace", killed_after_the_first_sample)
    gen = tmp_path / "gen"
    with pytest.raises(KeyboardInterrupt):
        from generation.cli import GenerateOptions
        from generation.generate import generate
        generate(GenerateOptions.defaults(dit_checkpoint=str(trained / "checkpoints" / "best.ckpt"),
                                          vavae_path=str(tokenizer), output_dir=str(gen), user_ids=[1, 2],
                                          num_samples_per_user=2, num_steps=2), log=lambda m: None)
    monkeypatch.undo()
    assert len(list(gen.glob("micro_doppler_*.png"))) == 1   # one of the five moved in
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2", "ID_10"), per_user=2, val_per_user=1)
    proc = run_main(capsys, "stage4_evaluate.py", "--data_dir", data, "--generated_dir", gen, "--output_dir",
                    tmp_path / "eval", "--image_size", 64)
    assert_user_error(proc, r"a stage 3 run stopped while moving its samples", r"Rerun stage 3")


def test_checkpoint_interrupted_mid_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """Stage 2's checkpoints go through atomic_path: a kill mid-save leaves last.ckpt as it was."""
    import common.io
    from training.callbacks import AtomicCheckpointIO
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])   # truncated, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(common.io.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 10, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_ckpt(path)["global_step"] == 5 and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_orchestrator_reruns_a_stage_without_marker(tmp_path, monkeypatch):
    import pipeline.orchestrate as orch
    calls, codes = [], [1, 0]
    monkeypatch.setattr(orch.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or codes.pop(0))
    args = argparse.Namespace(output_dir=str(tmp_path), stages=[1], force=False, generate_user_ids=[1],
                              data_dir="d", vavae_path="v", batch_size=4, devices=1, max_epochs=1,
                              num_samples_per_user=1)
    marker = tmp_path / orch.STAGE_DIRS[1] / orch.DONE_MARKER
    with pytest.raises(PipelineError, match=r"stage 1 failed \(exit code 1\).*finished stages are skipped"):
        orch.run_pipeline(args, [], log=lambda m: None)
    assert not marker.exists() and len(calls) == 1
    orch.run_pipeline(args, [], log=lambda m: None)            # interrupted stage: run again
    assert marker.is_file() and len(calls) == 2
    logged = []
    orch.run_pipeline(args, [], log=logged.append)              # finished: skipped
    assert len(calls) == 2 and "already complete" in logged[0]
    marker.unlink()
    codes.append(0)
    orch.run_pipeline(args, [], log=lambda m: None)             # marker gone: the stage runs again
    assert len(calls) == 3


def _fake_stages(monkeypatch) -> list[list[str]]:
    """Stage processes replaced by a recorder of their command lines (each 'succeeds')."""
    import pipeline.orchestrate as orch
    calls: list[list[str]] = []
    monkeypatch.setattr(orch.subprocess, "call", lambda cmd, **kwargs: calls.append(cmd) or 0)
    return calls


def _pipeline_args(out: Path, **overrides) -> argparse.Namespace:
    values = dict(output_dir=str(out), stages=[2, 3], force=False, generate_user_ids=[1], data_dir="d",
                  vavae_path="v", batch_size=4, devices=1, max_epochs=1, num_samples_per_user=1)
    return argparse.Namespace(**{**values, **overrides})


def test_orchestrator_reruns_a_stage_whose_flags_changed(tmp_path, monkeypatch):
    import pipeline.orchestrate as orch
    calls, logged = _fake_stages(monkeypatch), []
    orch.run_pipeline(_pipeline_args(tmp_path), ["--guidance_scale", "2"], log=lambda m: None)
    assert len(calls) == 2
    orch.run_pipeline(_pipeline_args(tmp_path), ["--guidance_scale", "2"], log=logged.append)    # same: both skipped
    assert len(calls) == 2 and sum("already complete" in m for m in logged) == 2
    logged.clear()
    orch.run_pipeline(_pipeline_args(tmp_path, generate_user_ids=[2, 3]), ["--num_steps", "3"], log=logged.append)
    assert len(calls) == 3 and calls[-1][1].endswith("stage3_inference.py")
    assert calls[-1][calls[-1].index("--user_ids") + 1:][:2] == ["2", "3"]
    redone = next(m for m in logged if "stage 3: redone" in m)
    assert "--user_ids: 1 -> 2 3" in redone and "--num_steps 3 added" in redone and "--guidance_scale 2 removed" in redone
    assert "stage 2: already complete" in logged[0]
    # Stage 2 redone (its flags changed): stage 3, made from the old model, is redone too.
    logged.clear()
    orch.run_pipeline(_pipeline_args(tmp_path, max_epochs=2, generate_user_ids=[2, 3]), ["--num_steps", "3"],
                      log=logged.append)
    assert [c[1].rsplit("/", 1)[-1] for c in calls[3:]] == ["stage2_train_dit.py", "stage3_inference.py"]
    assert any("--max_epochs: 1 -> 2" in m for m in logged)
    assert any("stage 3: redone (the stage before it was redone since)" in m for m in logged)


def test_orchestrator_force_trains_stage2_anew(tmp_path, monkeypatch):
    import pipeline.orchestrate as orch
    calls = _fake_stages(monkeypatch)
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2]), [], log=lambda m: None)
    assert "--restart" not in calls[-1]                    # an interrupted run resumes
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2], force=True), [], log=lambda m: None)
    assert len(calls) == 2 and "--restart" in calls[-1]
    logged = []
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2]), [], log=logged.append)   # --restart is not a change
    assert len(calls) == 2 and "already complete" in logged[0]


def test_orchestrator_from_another_folder_with_relative_paths(tmp_path, tokenizer):
    """Paths mean what they mean in the user's shell: data, tokenizer, outputs and markers."""
    work = tmp_path / "work"
    make_dataset(work / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=2)
    shutil.copy(tokenizer, work / "tok.safetensors")
    proc = subprocess.run([PYTHON, str(ROOT / "run_complete_pipeline.py"), "--data_dir", "data", "--vavae_path",
                           "tok.safetensors", "--output_dir", "out", "--stages", "1", "--batch_size", "4",
                           "--image_size", "64", "--num_workers", "0"],
                          cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage1 = work / "out" / "latent_features"
    assert (stage1 / "train.safetensors").is_file() and (stage1 / ".stage_complete.json").is_file()
    assert read_safetensors_metadata(stage1 / "train.safetensors")["user_numbers"] == [1, 2]


#################################################################################
#                          Interruption and resume                              #
#################################################################################

def _progress_step(log: str) -> int:
    """The highest step the progress lines show (a log file is not a terminal: 'stage 2: step k/N ...')."""
    return max((int(k) for k in re.findall(r"^stage 2: step (\d+)/", log, re.M)), default=-1)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
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


def test_stage2_is_deterministic_and_resume_picks_up_finished_run(trained, latents):
    """Same command again on a finished run: resumes at the end, changes nothing."""
    before = load_ckpt(trained / "checkpoints" / "last.ckpt")
    proc = subprocess.run(stage2_command(latents, trained), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"at step {STEPS}" in proc.stdout, proc.stderr[-2000:]
    after = load_ckpt(trained / "checkpoints" / "last.ckpt")
    for key, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], value), key


#################################################################################
#                                Non-finite loss                                #
#################################################################################

def test_nonfinite_loss_stops_with_advice_and_keeps_good_checkpoint(tmp_path, latents):
    out = tmp_path / "nan"
    proc = run_stage(S2, *stage2_args(latents, out, "--max_steps", 30, "--checkpoint_every_n_steps", 1,
                                      "--lr", "1e30"))
    assert_user_error(proc, rf"NaN/inf by step 1 \(precision {TINY_PRECISION}, lr 1e\+30\)",
                      r"last good checkpoint, \S*last\.ckpt \(step 1\), is kept", r"lower --lr", r"--use_qknorm")
    ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def _train_in_process(latents: Path, out: Path, *extra):
    from training.cli import training_options
    from training.train_dit import train
    args = training_options(
        list(map(str, stage2_args(latents, out, "--log_every_n_steps", 1, *extra))))
    return train(args, log=lambda m: None)


@pytest.mark.parametrize("nan_step, every, max_steps", [(7, 5, 40), (23, 1000, 200)])
def test_nonfinite_loss_is_caught_between_checkpoints(tmp_path, latents, monkeypatch, nan_step, every, max_steps):
    # With validation (and its last.ckpt) rare, only the periodic check of the device flag can stop the run.
    """NaN at a given step: the error names that step, the run stops soon (not only at checkpoint time)."""
    import training.dit_module as dm
    real, calls = dm.sample_timesteps, []

    def nan_from_step(n, *args, **kwargs):
        calls.append(n)
        t = real(n, *args, **kwargs)
        return t * float("nan") if len(calls) > nan_step else t

    monkeypatch.setattr(dm, "sample_timesteps", nan_from_step)
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match=rf"NaN/inf by step {nan_step} \(precision {TINY_PRECISION}") as err:
        _train_in_process(latents, out, "--max_steps", max_steps, "--checkpoint_every_n_steps", every,
                          "--val_every_n_epochs", 1 if every < nan_step else 1000)
    assert len(calls) <= max(nan_step + 1, 10) + NONFINITE_CHECK_EVERY
    if every < nan_step:
        ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")   # the last one from before the NaN step is kept
        assert 0 < ckpt["global_step"] <= nan_step
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    else:
        assert not (out / "checkpoints" / "last.ckpt").exists()
        assert "No checkpoint was written before it" in str(err.value)   # none is claimed to be kept


def test_fp16_uses_loss_scaling(monkeypatch):
    from pytorch_lightning.plugins.precision import MixedPrecision
    from common.device import resolve_precision
    with pytest.warns(UserWarning):   # GradScaler disables itself without CUDA; on a GPU it scales
        plugin = MixedPrecision("16-mixed", "cuda")
    assert isinstance(plugin.scaler, torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))   # a T4
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16-mixed", "cuda") == "16-mixed"


#################################################################################
#                                 Determinism                                   #
#################################################################################

def test_stage1_is_deterministic(tmp_path, latents, tokenizer):
    """The same command gives the same latents, bit for bit (the fixture's own command, in its own process: another
    batch size or thread count may change the last float bit of a convolution)."""
    from data.latent_files import load_latents
    proc = run_stage(S1, *stage1_args(latents.parent / "data", tokenizer, tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "val"):
        a, b = load_latents(latents, split), load_latents(tmp_path / "again", split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stage3_is_deterministic(tmp_path, trained, tokenizer):
    from generation.cli import GenerateOptions
    from generation.generate import generate
    ckpt = str(trained / "checkpoints" / "last.ckpt")

    def run(out: str, batch_size: int) -> list:
        return generate(GenerateOptions.defaults(dit_checkpoint=ckpt, vavae_path=str(tokenizer), output_dir=out,
                                                 user_ids=[1, 10], num_samples_per_user=2, num_steps=3, seed=5,
                                                 device="cpu", batch_size=batch_size), log=lambda m: None)
    first, second = run(str(tmp_path / "a"), 4), run(str(tmp_path / "b"), 4)
    other_batching = run(str(tmp_path / "c"), 1)
    assert [p.name for p in first] == [p.name for p in second] == [p.name for p in other_batching]
    load = lambda p: np.asarray(Image.open(p)).astype(np.int16)
    for p, q, r in zip(first, second, other_batching):
        assert np.array_equal(load(p), load(q))          # same command: the same images, bit for bit
        assert np.abs(load(p) - load(r)).max() <= 1      # noise per (user, sample): batching only rounds
    assert not np.array_equal(load(first[0]), load(first[1]))   # different samples differ
