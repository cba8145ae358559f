"""Shared test helpers: tiny image datasets, a tiny tokenizer, tiny-DiT flags, a malicious checkpoint,
running the stage scripts (as subprocesses or in-process), and published-layout DiT weights with tiny latents."""
import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from common.device import bf16_supported
from common.io import save_safetensors
from models.checkpoint import PipelineInfo
from models.lightningdit import LightningDiT, model_config
from models.vavae import VAVAE, save_vavae
from training.cli import training_options
from training.train_dit import build_module

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_VAVAE = dict(ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=64,
                  norm_groups=4)
IMAGE_SIZE = 64
# Stage 2 runs as on a GPU: mixed precision, fused AdamW, gradient clipping (default 1.0). bf16-mixed where the
# CPU has native bf16 (else stage 2 would fall back to 32-true with a warning; test_gpu_path forces bf16 there).
TINY_PRECISION = "bf16-mixed" if bf16_supported("cpu") else "32-true"
TINY_DIT = dict(depth=1, hidden_size=32, num_heads=2)          # LightningDiT-S/2 cut down to one 32-wide block
TINY_DIT_MODEL_FLAGS = ["--model", "LightningDiT-S/2", *[a for k, v in TINY_DIT.items() for a in (f"--{k}", str(v))]]
TINY_DIT_FLAGS = [*TINY_DIT_MODEL_FLAGS, "--precision", TINY_PRECISION, "--accelerator", "cpu"]


#################################################################################
#                                 Tiny datasets                                 #
#################################################################################

Draw = Callable[[np.random.Generator, int, int], tuple[Image.Image, str]]   # (rng, user index, image index)


def mixed_image(rng: np.random.Generator, user: int, index: int) -> tuple[Image.Image, str]:
    """Spectrogram-like noise in several sizes and modes (grey, RGB, RGBA, palette, 16-bit); every other
    grey or RGB image a JPEG."""
    kind = user + index
    h, w = [(64, 64), (80, 96), (128, 100), (70, 64)][kind % 4]
    arr = (rng.random((h, w)) * 255).astype(np.uint8)
    mode = kind % 5
    if mode == 0:
        image = Image.fromarray(arr, "L")
    elif mode == 1:
        image = Image.fromarray(np.stack([arr, arr[::-1], 255 - arr], -1), "RGB")
    elif mode == 2:
        image = Image.fromarray(np.stack([arr, arr, arr, np.full_like(arr, 200)], -1), "RGBA")
    elif mode == 3:
        image = Image.fromarray(arr, "L").convert("P")
    else:
        image = Image.fromarray(arr.astype(np.uint16) * 200)   # 16-bit grey (mode I;16)
    return image, ".jpg" if index % 2 and image.mode in ("L", "RGB") else ".png"


def track_image(rng: np.random.Generator, user: int, index: int, size: int = 40) -> tuple[Image.Image, str]:
    """A noisy floor with three bright periodic tracks whose rate depends on the user (a 40 px RGB png)."""
    t = np.linspace(0, 1, size)
    img = rng.uniform(0, 40, (size, size, 3))
    for k in range(3):
        rows = (size / 2 + size / 4 * np.sin(2 * np.pi * (user + 1 + k) * t + rng.uniform(0, 6))).astype(int)
        img[np.clip(rows, 0, size - 1), np.arange(size)] = (255, 200 - 50 * k, 40)
    return Image.fromarray(img.astype(np.uint8)), ".png"


def make_dataset(root: str | os.PathLike, users=("ID_1", "ID_2", "ID_10"), per_user: int = 5,
                 val_per_user: int | None = None, seed: int | np.random.Generator = 0,
                 draw: Draw = mixed_image) -> Path:
    """User folders of img_NNN files drawn by `draw`: root/<user>/, or root/train/<user>/ and root/val/<user>/
    when `val_per_user` is given. A Generator as `seed` goes on drawing from its own stream."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = (("train", per_user), ("val", val_per_user)) if val_per_user is not None else (("", per_user),)
    for u, name in enumerate(users):
        for split, count in splits:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, suffix = draw(rng, u, i)
                image.save(folder / f"img_{i:03d}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return root


def make_tokenizer(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny VA-VAE (latents (32, 4, 4) for 64x64 images) written as our safetensors tokenizer."""
    torch.manual_seed(seed)
    save_vavae(VAVAE(**{**TINY_VAVAE, **overrides}), path)
    return Path(path)


class _Payload:
    """Unpickling this runs code: it writes 'pwned' to `marker`."""
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_malicious(path: Path, marker: Path, key: str = "state_dict", weight: str = "encoder.conv_in.weight",
                    legacy: bool = False) -> Path:
    """A checkpoint {key: {weight: payload}, "pipeline": payload} whose unpickling writes `marker`; torch.save's
    zip format, or with `legacy` a plain pickle."""
    obj = {key: {weight: _Payload(marker)}, "pipeline": _Payload(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path


#################################################################################
#                              Running the stages                               #
#################################################################################

def run_stage(script: str, *args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a stage script from the repository root; returns the completed process (text output)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "default"}
    return subprocess.run([PYTHON, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


class Result:
    """The parts of a finished stage run the tests look at (subprocess or in-process)."""
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(capsys, script: str, *args) -> Result:
    """A stage's main() in this process: exit code, stdout and stderr, as from the command line."""
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    try:
        module.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_user_error(proc, *patterns: str) -> None:
    """Exit code 2, 'error: ...' on stderr matching every pattern, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.rindex("error: "):]
    for pattern in patterns:
        assert re.search(pattern, message, re.S), (pattern, message)


def stage1_args(data_dir, vavae_path, output_path, *extra) -> list[str]:
    return ["--data_dir", str(data_dir), "--vavae_path", str(vavae_path), "--output_path", str(output_path),
            "--image_size", str(IMAGE_SIZE), "--batch_size", "4", "--num_workers", "0", *map(str, extra)]


# The noisy-latent user classifier stage 2 trains first: its default 600 steps are most of a tiny run's time (tens of
# seconds on 2 cores); 20 still run its whole path (training, val_identity, the checkpoint entry). Tests of the
# classifier itself pass their own count (a later flag wins).
TINY_CLASSIFIER_FLAGS = ["--classifier_steps", "20"]


def stage2_args(latent_dir, output_dir, *extra) -> list[str]:
    return ["--latent_dir", str(latent_dir), "--output_dir", str(output_dir), "--batch_size", "4",
            *TINY_DIT_FLAGS, *TINY_CLASSIFIER_FLAGS, *map(str, extra)]


#################################################################################
#            Stage 2 from published weights (--init_from, --finetune)           #
#################################################################################

PUBLISHED_CLASSES = 10
USERS = ["ID_1", "ID_2", "ID_3"]


def tiny_dit(num_classes: int = PUBLISHED_CLASSES, seed: int = 0, **overrides) -> LightningDiT:
    """A tiny LightningDiT with every weight (adaLN/final included) filled with noise: nothing is zero."""
    kw = dict(input_size=4, **TINY_DIT)
    kw.update(overrides)
    model = LightningDiT(**model_config("LightningDiT-S/2", num_classes=num_classes, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_generator_checkpoint(path: Path, users: list[str] = USERS, user_numbers: list[int] = (1, 2, 3)) -> Path:
    """A stage 2 checkpoint as stage 3 reads it: tiny_dit as the EMA model of `users`, latents (32, 4, 4) of
    zero mean and unit std, 64 px images."""
    config = model_config("LightningDiT-S/2", num_classes=len(users), input_size=4, **TINY_DIT)
    info = PipelineInfo(model_config=config, users=list(users), user_numbers=list(user_numbers),
                        latent_mean=torch.zeros(1, 32, 1, 1), latent_std=torch.ones(1, 32, 1, 1), image_size=IMAGE_SIZE)
    ema = tiny_dit(num_classes=len(users)).state_dict()
    torch.save({"state_dict": {f"ema.{k}": v for k, v in ema.items()}, "pipeline": info.to_dict()}, path)
    return path


def write_published(folder: Path) -> tuple[Path, dict, dict]:
    """A reference-format file: {'model', 'ema', 'opt', 'config'}, the model half saved from a DDP wrapper."""
    model, ema = tiny_dit(seed=1).state_dict(), tiny_dit(seed=2).state_dict()
    path = folder / "lightningdit-tiny.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.items()}, "ema": ema,
                "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                        "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "params": [0]}]},
                "config": {"model": {"model_type": "LightningDiT-S/2", "in_chans": 32, "use_rope": True},
                           "train": {"global_batch_size": 1024}}}, path)
    return path, model, ema


def write_latent_dir(out: Path) -> Path:
    """Stage 1 output for 3 users: (N, 32, 4, 4) latents, user ids, users/user_numbers metadata, stats."""
    g = torch.Generator().manual_seed(0)
    meta = {"users": USERS, "user_numbers": [1, 2, 3], "image_size": 64}
    for split, n in (("train", 24), ("val", 6)):
        save_safetensors({"latents": torch.randn(n, 32, 4, 4, generator=g),
                          "user_ids": torch.arange(n, dtype=torch.int64) % 3}, out / f"{split}.safetensors",
                         {**meta, "split": split})
    save_safetensors({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)},
                     out / "latent_stats.safetensors", meta)
    return out


def make_module(latent_dir: Path, *flags: str):
    args = training_options(
        ["--latent_dir", str(latent_dir), "--output_dir", "unused", *TINY_DIT_MODEL_FLAGS, *flags])
    return build_module(args, log=lambda m: None)


#################################################################################
#                       The reference stage 2 run (conftest)                    #
#################################################################################

STEPS, EVERY = 60, 5     # the reference run: 60 steps, last.ckpt every 5


def stage2_command(latents: Path, out: Path, *extra) -> list[str]:
    """Stage 2 as a subprocess command: STEPS steps, last.ckpt every EVERY. No validation (it also writes
    last.ckpt, at epoch ends, after the EMA update), so that a resume starts from a mid-step checkpoint, where the
    EMA update was once missed."""
    flags = ("--max_steps", STEPS, "--checkpoint_every_n_steps", EVERY, "--log_every_n_steps", 1,
             "--val_every_n_epochs", 1000)
    return [PYTHON, "stage2_train_dit.py", *stage2_args(latents, out, *flags, *extra)]


def train_in_process(latents: Path, out: Path, *extra):
    """Stage 2's train() in this process with the tiny flags (stage2_args) and `extra`; returns what train returns."""
    from training.cli import training_options
    from training.train_dit import train
    return train(training_options(list(map(str, stage2_args(latents, out, *extra)))), log=lambda m: None)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
