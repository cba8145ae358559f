"""REPA in stage 2: align an early DiT block's tokens with a frozen encoder's features of the clean image.

Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think"
(ICLR 2025), eq. 8: L = L_velocity + lambda * mean over tokens of -cos(h_phi(f_k(x_t)), y), where f_k(x_t) are the
tokens after block k of the DiT on the noisy input, h_phi a small MLP projector trained with it, and y the frozen
encoder's patch features of the clean image (stage 1 writes them: data/repa_targets.py). The paper's lambda is 0.5
at about a third of the depth (block 8 of SiT-XL's 28). HASTE (Wang et al. 2025) stops the term part-way:
--repa_stop_step.
"""
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import PipelineError
from training.augment import shift_time

PROJECTOR_MAX_WIDTH = 2048   # REPA's projector width (SiT-XL); narrower models get 2 x hidden_size


def default_repa_depth(depth: int) -> int:
    """REPA's alignment block for a DiT of `depth` blocks: about a third of the way up, at least the first."""
    return max(1, round(depth / 3))


class Projector(nn.Sequential):
    """REPA's h_phi: Linear-SiLU-Linear-SiLU-Linear from hidden_size to the target dimension, width
    min(2048, 2 * hidden_size)."""
    def __init__(self, hidden_size: int, target_dim: int):
        width = min(PROJECTOR_MAX_WIDTH, 2 * hidden_size)
        super().__init__(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, target_dim))


def targets_on_tokens(targets: torch.Tensor, shifts: torch.Tensor | None, token_grid: int) -> torch.Tensor:
    """Targets on the latent grid (N, g*g, D) -> on the DiT's token grid (N, t*t, D), t = token_grid (g / patch
    size): first rolled along time like the latents (--time_shift_aug; shifts (N,) int64 latent columns, or None),
    then averaged over each patch's latent cells."""
    n, cells, dim = targets.shape
    grid = int(round(cells ** 0.5))
    maps = targets.transpose(1, 2).reshape(n, dim, grid, grid)
    if shifts is not None:
        maps = shift_time(maps, shifts)
    if token_grid != grid:
        maps = F.adaptive_avg_pool2d(maps, token_grid)
    return maps.flatten(2).transpose(1, 2)


def repa_loss(projector: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss, -mean over tokens of cos(projector(tokens), targets).

    tokens: (N, T, hidden_size) DiT tokens after the alignment block; targets: (N, T, D) on the same token grid
    (targets_on_tokens). Returns (N,) float32 in [-1, 1]."""
    projected = projector(tokens).float()
    return -F.cosine_similarity(projected, targets.float(), dim=-1).mean(dim=1)


class RepaAlignment(Projector):
    """REPA in stage 2's training step: the projector h_phi trained with the DiT, the train latents' targets, the
    aligned block and the term's weight by step.

    DiTTrainingModule registers it as `repa_projector`, so the projector's weights are the checkpoints'
    repa_projector.* entries; the targets are a non-persistent buffer (on the training device, not in checkpoints),
    stored in float16 (half the memory; REPA compares directions only).
    targets: (N_train, g*g, D) rows in train-latent order (stage 1's repa_targets.safetensors); depth: the aligned
    block (1..num_blocks; None: default_repa_depth); weight: --repa_weight; stop_step: --repa_stop_step (HASTE).
    Raises PipelineError for a depth that is not a block of the model.
    """
    def __init__(self, hidden_size: int, num_blocks: int, targets: torch.Tensor, weight: float,
                 depth: int | None = None, stop_step: int | None = None):
        depth = depth or default_repa_depth(num_blocks)
        if not 1 <= depth <= num_blocks:
            raise PipelineError(f"--repa_depth {depth} is not a block of this {num_blocks}-block model: "
                                f"pass 1..{num_blocks}")
        super().__init__(hidden_size, targets.shape[-1])
        self.depth, self.weight, self.stop_step = depth, weight, stop_step
        self.register_buffer("targets", targets.half(), persistent=False)

    def weight_at(self, step: int) -> float:
        """The term's weight at a global step: --repa_weight, 0 from --repa_stop_step on. Weighted 0 rather than
        skipped: under DDP every parameter, the projector's too, must take part in each backward."""
        return self.weight if self.stop_step is None or step < self.stop_step else 0.0

    def aligned(self, model: Callable, idx: torch.Tensor, shifts: torch.Tensor | None,
                token_grid: int) -> tuple[Callable, dict]:
        """(a velocity model for flow_matching_loss, a dict that receives its REPA loss (N,) under "loss"): the
        same forward also returns the tokens after block `depth`, scored against the targets of the batch's
        latents idx (N,) on the DiT's token_grid x token_grid tokens, rolled by the batch's time shifts (or None).
        model: a LightningDiT forward (x, t, y, features_at=...) -> (velocity, tokens)."""
        targets = targets_on_tokens(self.targets[idx], shifts, token_grid)
        alignment = {}

        def velocity(x, t, y):
            v, tokens = model(x, t, y, features_at=self.depth)
            alignment["loss"] = repa_loss(self, tokens, targets)
            return v
        return velocity, alignment
