"""Shared test fixtures: a tiny image dataset, a tiny tokenizer, and running the stage scripts."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.device import bf16_supported

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_VAVAE = dict(ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=64,
                  norm_groups=4)
IMAGE_SIZE = 64
# Stage 2 runs as on a GPU: mixed precision, fused AdamW, gradient clipping (default 1.0). bf16-mixed where the
# CPU has native bf16 (else stage 2 would fall back to 32-true with a warning; test_gpu_path forces bf16 there).
TINY_PRECISION = "bf16-mixed" if bf16_supported("cpu") else "32-true"
TINY_DIT_FLAGS = ["--model", "LightningDiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2",
                  "--precision", TINY_PRECISION, "--accelerator", "cpu"]


def make_tokenizer(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny VA-VAE (latents (32, 4, 4) for 64x64 images) written as our safetensors tokenizer."""
    import torch
    from models.vavae import VAVAE, save_vavae
    torch.manual_seed(seed)
    save_vavae(VAVAE(**{**TINY_VAVAE, **overrides}), path)
    return Path(path)


def _image(rng: np.random.Generator, kind: int) -> Image.Image:
    """Spectrogram-like noise in several sizes and modes (grey, RGB, RGBA, palette, 16-bit)."""
    h, w = [(64, 64), (80, 96), (128, 100), (70, 64)][kind % 4]
    arr = (rng.random((h, w)) * 255).astype(np.uint8)
    mode = kind % 5
    if mode == 0:
        return Image.fromarray(arr, "L")
    if mode == 1:
        return Image.fromarray(np.stack([arr, arr[::-1], 255 - arr], -1), "RGB")
    if mode == 2:
        return Image.fromarray(np.stack([arr, arr, arr, np.full_like(arr, 200)], -1), "RGBA")
    if mode == 3:
        return Image.fromarray(arr, "L").convert("P")
    return Image.fromarray(arr.astype(np.uint16) * 200)   # 16-bit grey (mode I;16)


def make_dataset(root: str | os.PathLike, users=("ID_1", "ID_2", "ID_10"), per_user: int = 5,
                 seed: int = 0, split: bool = False) -> Path:
    """User folders with png and jpg images of mixed sizes and modes (`split`: train/ and val/ layout)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for u, name in enumerate(users):
        for split_name, count in ((("train", per_user), ("val", 2)) if split else ((None, per_user),)):
            folder = root / split_name / name if split_name else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _image(rng, u + i)
                if i % 2 and image.mode in ("L", "RGB"):
                    image.save(folder / f"img_{i:03d}.jpg", quality=90)
                else:
                    image.save(folder / f"img_{i:03d}.png")
    return root


def run_stage(script: str, *args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a stage script from the repository root; returns the completed process (text output)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "default"}
    return subprocess.run([PYTHON, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def stage1_args(data_dir, vavae_path, output_path, *extra) -> list[str]:
    return ["--data_dir", str(data_dir), "--vavae_path", str(vavae_path), "--output_path", str(output_path),
            "--image_size", str(IMAGE_SIZE), "--batch_size", "4", "--num_workers", "0", *map(str, extra)]


def stage2_args(latent_dir, output_dir, *extra) -> list[str]:
    return ["--latent_dir", str(latent_dir), "--output_dir", str(output_dir), "--batch_size", "4",
            *TINY_DIT_FLAGS, *map(str, extra)]
