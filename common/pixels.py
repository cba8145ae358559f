"""Pixel conversions: uint8 images <-> the [-1, 1] floats the tokenizer reads and writes.

They live in common/ rather than data/images.py because models/vavae.py needs them: models/ sits below
data/ (data/latents.py imports models.vavae), and a model file should not pull in PIL and the folder logic.
"""
import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels p (any layout) -> float32 p / 127.5 - 1 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, same layout: the reference's 127.5 x + 128, clamped, truncated.

    That is round-half-up of 127.5 (x + 1), so it is the exact inverse of to_float and of the loader's
    p / 255 scaling for 8-bit pixels.
    """
    return images.mul(127.5).add(128.0).clamp(0, 255).to(torch.uint8)


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images against uint8 references of the same shape."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
