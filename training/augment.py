"""Non-leaking time-shift augmentation of the latents (EDM/ADA-style augmentation conditioning).

A gait cycle can start at any column of a spectrogram, so a training latent shifted along its last (time)
axis is another plausible start of the same walk. The shift is handed to the DiT as a condition
(LightningDiT(time_shift_cond=True)), and sampling asks for shift 0: the model learns from the shifted copies
without learning to emit them (the augmentation cannot leak into the samples).

The shift is circular (torch.roll), not crop + pad: every column stays real data of that person, nothing is
invented at the border, and the map is a bijection (its inverse is the opposite shift). The only artefact is
the seam where the last column meets the first, which the model sees at the column the condition names.
"""
import functools
from typing import Callable

import torch

from common.errors import PipelineError


def check_probability(p: float) -> float:
    """p itself; PipelineError unless 0 <= p <= 1."""
    if not 0.0 <= p <= 1.0:
        raise PipelineError(f"--time_shift_aug is a probability: pass a value in [0, 1] (got {p:g}; 0 = off)")
    return p


def random_time_shifts(n: int, width: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) int64 shifts in latent columns: 0 with probability 1 - p, else uniform in [1, width)."""
    shifted = torch.rand(n, device=device) < p
    amount = torch.randint(1, max(width, 2), (n,), device=device)
    return torch.where(shifted, amount, torch.zeros_like(amount))


def shift_time(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents, each rolled by its own shift along W: out[..., j] = x[..., (j - shift) % W]."""
    width = x.shape[-1]
    columns = (torch.arange(width, device=x.device) - shifts[:, None]) % width          # (B, W)
    return x.gather(-1, columns[:, None, None, :].expand_as(x))


def time_shifted(x1: torch.Tensor, model: Callable, p: float) -> tuple[torch.Tensor, Callable, torch.Tensor | None]:
    """(x1, the velocity model to train, the shifts or None): with probability p per latent (--time_shift_aug), the
    (B, C, H, W) latents rolled along time and the model (a LightningDiT forward) told each shift; p = 0 draws
    nothing and returns x1 and model unchanged."""
    if p <= 0:
        return x1, model, None
    shifts = random_time_shifts(len(x1), x1.shape[-1], p, device=x1.device)
    return shift_time(x1, shifts), functools.partial(model, time_shift=shifts), shifts
