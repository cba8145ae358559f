"""Frozen image encoders whose patch features are REPA's alignment targets.

REPA (Yu et al., "Representation Alignment for Generation", ICLR 2025) aligns an early DiT block's tokens with a
frozen encoder's patch features of the clean image. Both encoders here return those features as tokens on the
latent grid, (N, g*g, D) with g = image_size / 16 (16 for 256x256 images), so stage 2 can pool them onto any
patch size:

- DINOv2Encoder: the DINOv2 ViT (Oquab et al. 2023) that the published VA-VAE file carries, frozen, under
  `foundation_model.model.*` in timm's `vit_large_patch14_dinov2` layout (VA-VAE aligned its latents to it), so
  users of the published tokenizer have REPA's own target on disk.
- SpectrogramEncoder: a small CNN that stage 1 trains to tell the users apart on their own train images, for
  project tokenizers, which carry no foundation model.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_STRIDE = 16      # image pixels per latent cell (the VA-VAE's f16)
DINOV2_PREFIX = "foundation_model.model."
DINOV2_HEAD_DIM = 64    # every DINOv2 size (S/14 384/6, B/14 768/12, L/14 1024/16, g/14 1536/24)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def latent_grid(image_size: int) -> int:
    """Latent cells per side for square images of image_size px (ValueError unless a multiple of 16)."""
    if image_size % LATENT_STRIDE:
        raise ValueError(f"image size {image_size} is not a multiple of {LATENT_STRIDE}")
    return image_size // LATENT_STRIDE


#################################################################################
#                       DINOv2 (from the published VA-VAE file)                 #
#################################################################################

class DINOv2Block(nn.Module):
    """Pre-norm ViT block with LayerScale (timm's Block with init_values: keys norm1, attn.qkv, attn.proj, ls1.gamma,
    norm2, mlp.fc1, mlp.fc2, ls2.gamma)."""
    def __init__(self, dim: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = dim // DINOV2_HEAD_DIM
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp_hidden)
        self.mlp.fc2 = nn.Linear(mlp_hidden, dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)
        x = x + self.ls1(self.attn.proj(attended))
        return x + self.ls2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DINOv2Encoder(nn.Module):
    """DINOv2 ViT with a class token and learnt absolute positions for a pos_grid x pos_grid patch grid (37 for
    the published 518 px), resampled bicubically to the grid of the input, as timm's dynamic_img_size does."""
    def __init__(self, dim: int, depth: int, mlp_hidden: int, patch_size: int = 14, pos_grid: int = 37):
        super().__init__()
        self.patch_size, self.pos_grid = patch_size, pos_grid
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.blocks = nn.ModuleList(DINOv2Block(dim, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @property
    def dim(self) -> int:
        return self.cls_token.shape[-1]

    def positions(self, grid: int) -> torch.Tensor:
        """(1, 1 + grid*grid, dim): the class token's position and the patch positions resampled to grid x grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if grid != self.pos_grid:
            patch_pos = patch_pos.reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) float in [-1, 1] (stage 1's preprocessing), S a multiple of 16 -> (N, 3, 14g, 14g),
        g = S / 16: as REPA feeds DINOv2, ImageNet normalisation and a bicubic resize (224 px for 256 px images),
        so each patch sits on one latent cell."""
        grid = latent_grid(images.shape[-1])
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((images + 1) / 2 - mean) / std
        return F.interpolate(x, size=(grid * self.patch_size,) * 2, mode="bicubic", antialias=True, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 14g, 14g) preprocessed images -> (N, g*g, dim) final-norm patch tokens (timm's
        forward_features without the class token)."""
        grid = x.shape[-1] // self.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.positions(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) float in [-1, 1] -> (N, g*g, dim) float32 REPA targets, g = S / 16."""
        return self(self.preprocess(images)).float()


def dinov2_from_state_dict(state_dict: dict[str, torch.Tensor]) -> DINOv2Encoder | None:
    """The DINOv2 under `foundation_model.model.*` of a VA-VAE state dict (the published file's training-only
    keys, ../shared/reference/FACTS.md), frozen in eval mode; None when the file carries none (project tokenizers).
    Sizes come from the shapes (heads: dim / 64, as in every DINOv2). Raises RuntimeError naming missing or
    unexpected keys when the layout differs."""
    weights = {k[len(DINOV2_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DINOV2_PREFIX)}
    if not weights:
        return None
    dim = weights["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    pos_grid = math.isqrt(weights["pos_embed"].shape[1] - 1)
    encoder = DINOv2Encoder(dim, depth, mlp_hidden=weights["blocks.0.mlp.fc1.weight"].shape[0],
                            patch_size=weights["patch_embed.proj.weight"].shape[-1], pos_grid=pos_grid)
    weights.pop("mask_token", None)   # DINOv2's own layout has it (masked training only); timm's has none
    encoder.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return encoder.requires_grad_(False).eval()


#################################################################################
#                  SpectrogramEncoder (trained on the user's images)            #
#################################################################################

class SpectrogramEncoder(nn.Module):
    """A small CNN over images downsampled to 8 px per latent cell (128 px for 256 px images): four 3x3
    conv-GroupNorm-SiLU layers, three of stride 2, ending on the latent grid; a linear user classifier on their
    mean is the head stage 1 trains it with. Its last feature map is the target."""
    def __init__(self, num_users: int, width: int = 96):
        super().__init__()
        channels = [3, 32, 64, width, width]
        layers = []
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i < 3 else 1, padding=1),
                       nn.GroupNorm(8, c_out), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_users)

    @property
    def dim(self) -> int:
        return self.head.in_features

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) float in [-1, 1] -> (N, width, g, g), g = S / 16."""
        grid = latent_grid(images.shape[-1])
        return self.body(F.interpolate(images, size=(8 * grid,) * 2, mode="area"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, num_users) user logits."""
        return self.head(self.feature_map(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, g*g, width) float32 tokens on the latent grid, row-major."""
        return self.feature_map(images).flatten(2).transpose(1, 2).float()
