"""LightningDiT: a diffusion transformer on VA-VAE latents, conditioned on a class (here: the user).

State-dict layout and constructor keywords follow the published LightningDiT checkpoints, so their
weights load unchanged; the numerics equal the reference to float32 round-off.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


#################################################################################
#                  Embedding Layers for Timesteps and Class Labels              #
#################################################################################

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) with a strided convolution."""
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoid of the raw t in [0, 1] (cos half first), then a 2-layer MLP."""
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes): the null class for guidance."""
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train: bool):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


#################################################################################
#                        Norms, RoPE, Attention and MLP                         #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (the reference does this for stability), learnable weight."""
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x   # no copy when already fp32
        normed = F.rms_norm(x32, (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight

    def modulated(self, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        """modulate(self(x), shift, scale) in one autograd node (see _RMSNormModulate)."""
        return _RMSNormModulate.apply(x, self.weight, shift, scale, self.eps)


class _RMSNormModulate(torch.autograd.Function):
    """y = rms_norm(x) (float32 statistics), out = y * (weight * (1 + scale)) + shift, hand-differentiated.

    The weight is folded into the per-sample scale, and the backward is written out: autograd of the
    composite (pow, mean, rsqrt, three broadcast products) runs ~15 full-size passes over the activations
    and saves several of them; this runs ~7 and saves only y and the per-token 1/rms.
    """
    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps):
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)                # (B, N, 1) float32
        y = (x32 * rstd).to(x.dtype)
        s = weight * (1 + scale.unsqueeze(1))                                          # (B, 1, D)
        out = y * s if shift is None else torch.addcmul(shift.unsqueeze(1), y, s)
        ctx.save_for_backward(y, rstd, weight, scale)
        ctx.has_shift, ctx.x_dtype = shift is not None, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        y, rstd, weight, scale = ctx.saved_tensors
        one_plus = 1 + scale.unsqueeze(1)
        s = weight * one_plus
        y = y.to(grad.dtype)
        grad_y = grad * y
        grad_s = grad_y.sum(1, keepdim=True)                                           # (B, 1, D)
        # d(rms_norm): rstd * (g - y * mean(g * y)) with g = grad * s; the mean is a batched GEMV.
        g = grad * s
        mean_gy = torch.bmm(grad_y, s.transpose(1, 2).to(grad_y.dtype)) / y.shape[-1]    # (B, N, 1)
        grad_x = torch.addcmul(g, y, mean_gy, value=-1).mul_(rstd.to(g.dtype))
        grad_shift = grad.sum(1).to(scale.dtype) if ctx.has_shift else None
        grad_scale = (grad_s * weight).squeeze(1).to(scale.dtype)
        grad_weight = (grad_s * one_plus).sum((0, 1)).to(weight.dtype)
        return grad_x.to(ctx.x_dtype), grad_weight, grad_shift, grad_scale, None


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE (EVA-02 style): first half of head_dim rotates with the row, second with the column."""
    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half))
        angles = torch.arange(grid_size, dtype=torch.float32)[:, None] * freqs[None]   # (grid, half/2)
        angles = angles.repeat_interleave(2, dim=-1)                                     # (grid, half)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

        # rotate_half(x) * sin == swap_pairs(x) * signed_sin with signed_sin = (-sin, +sin) per pair.
        signed = angles.sin().unflatten(-1, (-1, 2)) * torch.tensor([-1.0, 1.0])
        self.register_buffer("signed_sin", signed.flatten(-2), persistent=False)

    def forward(self, x: torch.Tensor, token_dim: int = -2) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, tokens on token_dim of x (-2 for (B, H, N, d))."""
        shape = [1] * x.dim()
        shape[token_dim], shape[-1] = x.shape[token_dim], x.shape[-1]
        cos, sin = self.freqs_cos.to(x.dtype).view(shape), self.signed_sin.to(x.dtype).view(shape)
        return _Rotary.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)       # (a, b) -> (b, a): one copy
    return torch.addcmul(x * cos, swapped, signed_sin)


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: the map is orthogonal, its transpose is the same map with -sin.

    Autograd of the rotate_half formulation saves x and builds zero-filled gradients of the pair
    selects; this saves nothing but the tables and runs three passes each way.
    """
    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return _rotate(x, cos, signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, signed_sin = ctx.saved_tensors
        return _rotate(grad, cos, -signed_sin), None, None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        norm = (lambda d: RMSNorm(d)) if use_rmsnorm else (lambda d: nn.LayerNorm(d))
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, rope: VisionRotaryEmbedding | None):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if rope is not None and isinstance(self.q_norm, nn.Identity):
            # q and k rotated in one call on the (B, N, 2, H, d) part, tokens on dim 1. split (not
            # slicing) so that the backward concatenates instead of zero-filling two full qkv gradients.
            qk, v = qkv.split((2, 1), dim=2)
            q, k = rope(qk, token_dim=1).permute(2, 0, 3, 1, 4).unbind(0)
            v = v.squeeze(2).transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim, eps=1e-6) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale); RMSNorm does it in one fused autograd node."""
    if isinstance(norm, RMSNorm):
        return norm.modulated(x, shift, scale)
    return modulate(norm(x), shift, scale)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool,
                 use_swiglu: bool, use_rmsnorm: bool, wo_shift: bool):
        super().__init__()
        self.norm1 = make_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = make_norm(hidden_size, use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x, c, rope):
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(norm_modulate(self.norm1, x, shift_msa, scale_msa), rope))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(norm_modulate(self.norm2, x, shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool):
        super().__init__()
        self.norm_final = make_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_modulate(self.norm_final, x, shift, scale))


class LightningDiT(nn.Module):
    """Velocity model v(x_t, t, y) on (B, C, H, W) latents; y == num_classes is the null class."""
    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
        time_shift_cond: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Augmentation conditioning (EDM/ADA style, training with --time_shift_aug): one row per circular shift of
        # the latents along their last (time) axis, in latent columns; row 0 = unshifted, what sampling asks for.
        # Absent when off, so the published key layout is unchanged.
        self.time_shift_embedder = nn.Embedding(input_size, hidden_size) if time_shift_cond else None
        # Fixed sin-cos table; a Parameter (not a buffer) because published checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = VisionRotaryEmbedding(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.time_shift_embedder is not None:
            nn.init.zeros_(self.time_shift_embedder.weight)   # starts as a no-op: the model trains as without it
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, time_shift: torch.Tensor | None = None,
                features_at: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Forward pass of LightningDiT: the velocity at (x_t, t) for class y.

        x: (N, C, H, W) float latents on the flow path, C = in_channels, H = W = input_size (a multiple of
           patch_size); stage 2 feeds them normalised per channel (about mean 0, std 1: latent_stats).
           float32, or bf16/fp16 under autocast.
        t: (N,) float flow time in [0, 1]: 0 is pure noise, 1 is data (models/transport.py).
        y: (N,) int64 class indices in [0, num_classes]; num_classes is the null class (guidance). In training
           mode a share class_dropout_prob of the labels is replaced by the null class.
        time_shift: (N,) int64 in [0, W): the circular shift of x along its last (time) axis that training
           applied (models built with time_shift_cond only); None means unshifted (0), as at sampling.
        features_at: with a block count k in [1, depth], also return the tokens after block k, (N, T, hidden_size)
           with T = (H / patch_size)^2 row-major (REPA's alignment point, training/repa.py).
        Returns (N, C, H, W) velocity (x1 - x0 at the optimum), float32 (the autocast dtype under autocast);
        with learn_sigma only the first C of the 2C output channels. Raises IndexError for a label outside
        [0, num_classes] and RuntimeError for a spatial size other than input_size (the token grid is fixed).
        """
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if self.time_shift_embedder is not None:
            shift = torch.zeros_like(y) if time_shift is None else time_shift
            c = c + self.time_shift_embedder(shift).to(c.dtype)
        elif time_shift is not None:
            raise ValueError("time_shift given to a LightningDiT built without time_shift_cond")
        features = None
        for k, block in enumerate(self.blocks, start=1):
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
            if k == features_at:
                features = x
        x = self.unpatchify(self.final_layer(x, c))
        velocity = x[:, : self.in_channels] if self.learn_sigma else x
        if features_at is None:
            return velocity
        if features is None:
            raise ValueError(f"features_at={features_at} is not a block of this {len(self.blocks)}-block model")
        return velocity, features


#################################################################################
#                            Sine/Cosine Positional Embedding                   #
#################################################################################

def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid*grid, D): first half encodes the column, second the row; sin then cos (MAE/DiT convention)."""
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)
    return np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1).astype(np.float32)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                 LightningDiT Configs                          #
#################################################################################

TIME_SHIFT_TABLE = "time_shift_embedder.weight"   # the only key time_shift_cond adds

# (depth, hidden_size, num_heads); S is DiT's S, the reference has no S.
MODEL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
LightningDiT_models = {
    f"LightningDiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in MODEL_SIZES.items() for patch in (1, 2)
}
DEFAULT_MODEL = "LightningDiT-XL/1"


def model_config(name: str, num_classes: int, **overrides) -> dict:
    """Constructor keywords for a named size; None overrides are ignored, others win."""
    if name not in LightningDiT_models:
        raise KeyError(f"unknown model '{name}'; choose one of {', '.join(LightningDiT_models)}")
    config = dict(input_size=16, in_channels=32, num_classes=num_classes, **LightningDiT_models[name])
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config
