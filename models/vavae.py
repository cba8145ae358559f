# VA-VAE tokenizer: the latent-diffusion AutoencoderKL used by LightningDiT (f16d32 and narrower).
# Written from the architecture description in shared/reference/FACTS.md; state-dict names follow the
# published checkpoint so that `vavae-imagenet256-f16d32-dinov2.pt` loads strictly.
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import PipelineError
from common.io import load_safetensors, save_safetensors, torch_load_weights
from common.pixels import psnr_db, to_float, to_uint8

VAVAE_CONFIGS: dict[str, dict[str, Any]] = {
    "f16d32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                   z_channels=32, embed_dim=32, in_channels=3, out_channels=3, resolution=256,
                   norm_groups=32),
}
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")


#################################################################################
#                                Building Blocks                                #
#################################################################################

def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv3x3 layers with a residual; 1x1 `nin_shortcut` when the width changes."""
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))   # dropout is 0 in every VA-VAE config
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1 convs for q, k, v and the output."""
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C): one head whose width is the channel count, so SDPA's c^-0.5 is the reference scale.
        q, k, v = (f(y).flatten(2).transpose(1, 2).unsqueeze(1) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric pad (right, bottom) then a stride-2 3x3 conv, as in the reference."""
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _mid(ch: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A resolution level's ResnetBlocks, each followed by its attention block where it has one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


#################################################################################
#                               Encoder / Decoder                               #
#################################################################################

class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, in_channels,
                 resolution, norm_groups, **_):
        super().__init__()
        g, res = norm_groups, resolution
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, g))
                block_in = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, g)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)   # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, out_channels,
                 resolution, norm_groups, **_):
        super().__init__()
        g = norm_groups
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, g)
        levels = []
        for i in reversed(range(len(ch_mult))):    # built coarse-to-fine, stored as up.0 = finest
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], g))
                block_in = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))   # no tanh: outputs may leave [-1, 1]


#################################################################################
#                                    VA-VAE                                     #
#################################################################################

class VAVAE(nn.Module):
    """KL autoencoder: images in [-1, 1] <-> latents of embed_dim channels at 1/2^(levels-1) size."""
    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions=(16,), z_channels: int = 32, embed_dim: int = 32, in_channels: int = 3,
                 out_channels: int = 3, resolution: int = 256, norm_groups: int = 32):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=tuple(attn_resolutions), z_channels=z_channels,
                           embed_dim=embed_dim, in_channels=in_channels, out_channels=out_channels,
                           resolution=resolution, norm_groups=norm_groups)
        bad = [ch * m for m in (1, *ch_mult) if (ch * m) % norm_groups]
        if bad:
            raise ValueError(f"norm_groups={norm_groups} does not divide the channel counts {bad}")
        self.encoder = Encoder(**self.config)
        self.decoder = Decoder(**self.config)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the diagonal Gaussian posterior; logvar clamped to [-30, 20] as in LDM."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> latents: the posterior mean (deterministic; the posterior is narrow enough that it is what
        matters).

        x: (N, in_channels, H, W) float images in [-1, 1] (common.pixels.to_float of uint8), H and W multiples
           of downsample_factor (16 for f16d32). float32, or bf16/fp16 under autocast.
        Returns (N, embed_dim, H / f, W / f) raw (unnormalised) latents, f = downsample_factor, in x's dtype.
        Raises RuntimeError for a channel count other than in_channels.
        """
        return self.encode_posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images. z: (N, embed_dim, h, w) raw latents (undo stage 1's normalisation first:
        z * latent_std + latent_mean). Returns (N, out_channels, h * f, w * f) float images, nominally in
        [-1, 1] but not clamped (common.pixels.to_uint8 clamps). Raises RuntimeError for a channel count other
        than embed_dim."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@torch.no_grad()
def reconstruct(model: VAVAE, images: torch.Tensor, batch_size: int = 16,
                autocast=contextlib.nullcontext) -> torch.Tensor:
    """encode-mean -> decode of uint8 images (N, 3, H, W), returned as uint8 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for batch in torch.split(images, batch_size):
        with autocast():
            decoded = model.decode(model.encode(to_float(batch.to(device))))
        out.append(to_uint8(decoded.float()).cpu())
    return torch.cat(out)


def reconstruction_psnr(model: VAVAE, images: torch.Tensor, batch_size: int = 16,
                        autocast=contextlib.nullcontext) -> torch.Tensor:
    """Per-image PSNR (dB), (N,) float, of encode-mean -> decode for uint8 images (N, 3, H, W), both sides as uint8.

    The images may live on any device: reconstruct() hands back CPU images, so the comparison is on the CPU."""
    return psnr_db(reconstruct(model, images, batch_size, autocast), images.cpu())


#################################################################################
#                                 Save / Load                                   #
#################################################################################

def storage_state_dict(model: nn.Module, half: bool = False) -> dict[str, torch.Tensor]:
    """The state dict as save_vavae stores it: floating tensors as fp16 (half=True) or fp32 copies, the rest
    cloned, on the model's device. What a file holds, so that weights scored before saving are the ones saved."""
    dtype = torch.float16 if half else torch.float32
    return {k: (v.detach().to(dtype, copy=True) if v.is_floating_point() else v.detach().clone())
            for k, v in model.state_dict().items()}


def save_vavae(model: VAVAE, path: str | os.PathLike, extra_metadata: dict | None = None,
               half: bool = False) -> None:
    """Atomically write weights + constructor config as safetensors (fp16 storage with half=True)."""
    meta = {**(extra_metadata or {}), "kind": "vavae", "config": model.config,
            "storage_dtype": "float16" if half else "float32"}
    save_safetensors(storage_state_dict(model, half), path, meta)


def _describe(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


def read_tokenizer_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (state_dict, config) from our safetensors or the published torch pickle."""
    expected = "a VA-VAE tokenizer (encoder.*, decoder.*, quant_conv.*, post_quant_conv.* weights)"
    if path.suffix == ".safetensors":
        tensors, meta = load_safetensors(path)
        kind = meta.get("kind")
        if kind is not None and kind != "vavae":
            raise PipelineError(f"{path} is a '{kind}' file, but {expected} was expected (metadata kind "
                                "'vavae'). Check which file you passed as the tokenizer.")
        config = meta.get("config") if kind == "vavae" else None
        if isinstance(config, str):
            config = json.loads(config)
        _check_kind(path, tensors, [], expected)
        return tensors, dict(config or VAVAE_CONFIGS["f16d32"])
    obj = torch_load_weights(path, expected)
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, but {expected} was expected.")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise PipelineError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of weights.")
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    _check_kind(path, tensors, list(obj), expected)
    return tensors, dict(VAVAE_CONFIGS["f16d32"])


def _check_kind(path: Path, tensors: dict, top_keys: list[str], expected: str) -> None:
    """Refuse early, with a useful message, a file that holds no tokenizer at all (e.g. a DiT)."""
    if any(k.startswith(("encoder.", "decoder.")) for k in tensors):
        return
    found = ", ".join(list(tensors)[:5] or top_keys[:5]) or "nothing"
    dit = {"model", "ema", "pipeline"} & set(top_keys) or any(   # stage 2 checkpoints: model.*, ema.*
        k.removeprefix("model.").removeprefix("ema.").startswith(
            ("blocks.", "x_embedder.", "t_embedder.", "y_embedder.")) for k in tensors)
    hint = (" It looks like a DiT checkpoint, not a tokenizer: pass the VA-VAE file (the one used in stage 1) "
            "as --vavae_path, and a stage 2 checkpoint as --dit_checkpoint.") if dit else ""
    raise PipelineError(f"{path} is not {expected}: found keys {found}.{hint}")


def check_tokenizer_fits(vae: VAVAE, path: str | os.PathLike, image_size: int, channels: int, side: int,
                         other: str, advice: str) -> None:
    """The tokenizer at `path` must make (and decode) latents of `channels` x `side` x `side` from image_size px
    images, as `other` says (e.g. "the model of best.ckpt takes latents of"). Raises PipelineError naming both
    shapes and `advice` (what to pass instead)."""
    made = (vae.config["embed_dim"], image_size // vae.downsample_factor)
    if made != (channels, side):
        raise PipelineError(f"the tokenizer {path} makes latents of {made[0]} channels at {made[1]}x{made[1]} from "
                            f"{image_size} px images, but {other} {channels} channels at {side}x{side}: they "
                            f"do not belong together. {advice}")


def load_vavae(path: str | os.PathLike, device: str | torch.device = "cpu",
               memory_format: torch.memory_format = torch.channels_last) -> VAVAE:
    """Load a VA-VAE from the published .pt or our .safetensors; frozen, eval mode, float32.

    memory_format: of the convolution weights. channels_last (NHWC) is the fast path of oneDNN and cuDNN: on an
    AVX512 CPU it encoded 1.4x and decoded 1.4x faster than NCHW in fp32 (2x under bf16 autocast), the same
    numbers up to float rounding; inputs may be either layout, outputs come out channels_last. A trainer that
    picks its own layout passes torch.contiguous_format.
    Raises PipelineError for a file that is not a VA-VAE tokenizer or does not match its config."""
    path = Path(path)
    tensors, config = read_tokenizer_file(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    try:
        model = VAVAE(**config)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path} has an unusable tokenizer config {config}: {err}") from err
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = ([f"missing keys: {_describe(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_describe(unexpected)}"] if unexpected else [])
        raise PipelineError(f"{path} does not match the VA-VAE {config['ch']}-wide config: {'; '.join(parts)}. "
                            "The file is probably not a VA-VAE f16d32 tokenizer (or was saved by other code).")
    wrong = [f"{k} {tuple(tensors[k].shape)} vs expected {tuple(v.shape)}"
             for k, v in own.items() if tensors[k].shape != v.shape]
    if wrong:
        raise PipelineError(f"{path} has weights of the wrong shape: {'; '.join(wrong[:3])}"
                            f"{f' (+{len(wrong) - 3} more)' if len(wrong) > 3 else ''}. "
                            "It is not a tokenizer of this config.")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device, memory_format=memory_format).eval().requires_grad_(False)
