"""A noisy-latent user classifier p(y | x_t, t): classifier guidance at sampling and identity while training.

It reads the same normalised latents the DiT is trained on, at any point of the linear path
x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data; models/transport.py), so its gradient can steer sampling
(Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 4, with the classifier trained on noisy inputs),
and at t = 1 it says which user a generated latent looks like, without decoding.

A small ResNet on the (C, 16, 16) latent grid: a 2x2-patch stem, residual blocks whose GroupNorm is modulated by the
time embedding (scale and shift, as the DiT's adaLN), global average pooling, a linear head. About 0.3M
parameters at width 64: it trains in a minute on a CPU and adds a fraction of a DiT evaluation to a sampling step.
"""
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lightningdit import TimestepEmbedder

CLASSIFIER_STEPS = 600       # 0.97 val accuracy on clean demo latents after 300 (experiments/identity_levers.sh)


#################################################################################
#                                   Blocks                                      #
#################################################################################

class TimeModulatedBlock(nn.Module):
    """Pre-norm residual block: x + conv(act(mod(norm(x), t))) twice; the modulation starts at identity."""
    def __init__(self, width: int, time_dim: int):
        super().__init__()
        groups = min(8, width)
        self.norm1, self.norm2 = nn.GroupNorm(groups, width), nn.GroupNorm(groups, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.modulation = nn.Linear(time_dim, 4 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale1, shift1, scale2, shift2 = self.modulation(c)[:, :, None, None].chunk(4, dim=1)
        h = self.conv1(F.silu(self.norm1(x) * (1 + scale1) + shift1))
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale2) + shift2))
        return x + h


#################################################################################
#                                 Classifier                                    #
#################################################################################

class NoisyLatentClassifier(nn.Module):
    """Logits (N, num_classes) of the user from x_t (N, C, H, W) (normalised latents) and t (N,) in [0, 1]."""
    def __init__(self, in_channels: int = 32, num_classes: int = 31, width: int = 64, depth: int = 3):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.t_embedder = TimestepEmbedder(width)
        # 2x2 patches, as the DiT's /2 patchify: a quarter of the positions for every later layer.
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.blocks = nn.ModuleList([TimeModulatedBlock(width, width) for _ in range(depth)])
        self.norm = nn.GroupNorm(min(8, width), width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = F.silu(self.t_embedder(t))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2) if min(h.shape[-2:]) >= 8 else h   # 8 -> 4: a wider view for the later blocks
        return self.head(F.silu(self.norm(h)).mean(dim=(-2, -1)))

    def config(self) -> dict[str, int]:
        """The constructor's arguments: NoisyLatentClassifier(**config) rebuilds the network."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "width": self.stem.out_channels, "depth": len(self.blocks)}


def classifier_log_prob_gradient(classifier: NoisyLatentClassifier, x: torch.Tensor, t: torch.Tensor,
                                 y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t = x, t), (N, C, H, W) float32, with autograd enabled locally (callers may run under
    no_grad). x: (N, C, H, W); t: (N,) in [0, 1]; y: (N,) int64 class indices."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        log_p = F.log_softmax(classifier(x, t).float(), dim=-1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x)
    return grad


def classifier_entry(classifier: NoisyLatentClassifier) -> dict[str, Any]:
    """What PipelineInfo.latent_classifier holds: {'config': constructor args, 'state_dict': CPU float32 tensors}."""
    return {"config": classifier.config(),
            "state_dict": {k: v.detach().float().cpu() for k, v in classifier.state_dict().items()}}


def classifier_from_entry(entry: dict[str, Any], device: torch.device | str = "cpu") -> NoisyLatentClassifier:
    """The frozen classifier of a PipelineInfo.latent_classifier entry, on `device`."""
    classifier = NoisyLatentClassifier(**entry["config"])
    classifier.load_state_dict(entry["state_dict"])
    return classifier.to(device).eval().requires_grad_(False)
