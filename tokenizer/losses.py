"""The tokenizer's texture losses: a PatchGAN discriminator with the hinge loss and LDM's adaptive weight, and
LPIPS on a VGG-16.

Written from the published designs (taming-transformers' NLayerDiscriminator and LPIPS as used by the
latent-diffusion / VA-VAE training loss); the state-dict names follow the published VA-VAE file, whose training
loss module sits under `loss.*` (`loss.perceptual_loss.*`, `loss.discriminator.*`), so a fine-tune from that
file reuses both networks and nothing is downloaded.
"""
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import PipelineError
from common.io import load_any_weights, load_safetensors, torch_load_weights

LPIPS_PREFIX, DISC_PREFIX = "loss.perceptual_loss.", "loss.discriminator."
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# Where the LPIPS slices start inside torchvision's vgg16().features: they end after relu1_2, relu2_2,
# relu3_3, relu4_3 and relu5_3.
SLICE_BOUNDS = (0, 4, 9, 16, 23, 30)
FIRST_CONVS = (0, 5, 10, 17, 24)      # slices 2-5 open with the max-pool of the level before
DISC_BETAS = (0.5, 0.9)          # LDM's discriminator Adam


#################################################################################
#                              PatchGAN discriminator                           #
#################################################################################

class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator: images (B, C, H, W) in [-1, 1] -> (B, 1, h, w) real/fake logits, one per
    overlapping ~70-px patch (for n_layers 3), so it judges local texture rather than the layout.

    4x4 convs: stride 2 for the first n_layers, then stride 1; LeakyReLU 0.2; BatchNorm after every conv but
    the first and the last (which have biases). Module indices match `loss.discriminator.main.*`.
    """
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():          # DCGAN's init, as taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """The smallest multiple-of-16 image side that leaves at least one patch logit."""
        size = 16
        while size // 2 ** self.n_layers - 2 < 1:
            size += 16
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def discriminator_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> PatchDiscriminator:
    """A PatchDiscriminator of the width and depth the weights `main.*` have, loaded strictly.

    Raises PipelineError when the keys are not a PatchGAN's."""
    try:
        first = sd["main.0.weight"]
        n_layers = sum(1 for k in sd if k.endswith(".running_mean"))
        disc = PatchDiscriminator(first.shape[1], first.shape[0], n_layers)
        disc.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError) as err:
        raise PipelineError(f"{source} holds no PatchGAN discriminator of the LDM layout "
                            f"(main.0.weight ...): {str(err)[:300]}") from err
    return disc


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 0 once real logits are >= 1 and fake ones <= -1 everywhere."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM's calculate_adaptive_weight (without the disc_weight factor): ||d rec / d W|| / (||d g / d W|| + 1e-4)
    at the decoder's last layer W, clamped to [0, max_weight] and detached.

    With it the adversarial gradient on the output layer is disc_weight times the reconstruction's, whatever
    the two losses' magnitudes. Both graphs are kept for the backward that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class Adversary:
    """The discriminator, its Adam (betas 0.5/0.9 as in LDM) and the schedule of the decoder's GAN term.

    The discriminator trains from the first step; the decoder's GAN term switches on after `start` steps, so
    that it pushes against a discriminator that already tells reconstructions from images (a fresh one would
    only feed noise into a decoder that is already good). Both run under `autocast`; their losses in fp32.
    """
    def __init__(self, disc: PatchDiscriminator, weight: float, start: int, lr: float, autocast: Callable):
        self.disc, self.weight, self.start, self.autocast = disc, weight, start, autocast
        self.opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=DISC_BETAS)

    def active(self, step: int) -> bool:
        """Whether the decoder's GAN term is on at this (1-based) step: after `start` warm-up steps."""
        return step > self.start

    def generator_term(self, fake: torch.Tensor, rec_loss: torch.Tensor,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """-> (weighted GAN loss to add to the decoder's loss, logged parts). The discriminator's weights get
        no gradient from it."""
        self.disc.requires_grad_(False)
        with self.autocast():
            g_loss = generator_loss(self.disc(fake).float())
        self.disc.requires_grad_(True)
        d_weight = self.weight * adaptive_weight(rec_loss, g_loss, last_layer)
        return d_weight * g_loss, {"g_loss": g_loss.detach(), "d_weight": d_weight}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict:
        """One Adam step of the hinge loss on a batch of images and their (detached) reconstructions."""
        with self.autocast():
            logits_real, logits_fake = self.disc(real).float(), self.disc(fake.detach()).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt.step()
        accuracy = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        return {"d_loss": d_loss.detach(), "d_acc": accuracy.detach()}


#################################################################################
#                                     LPIPS                                     #
#################################################################################

class _ChannelWeights(nn.Module):
    """LPIPS's NetLinLayer: a 1x1 conv (C -> 1, no bias) weighting the squared feature differences.
    Index 0 held a dropout that is off at evaluation; an Identity keeps the key `model.1.weight`."""
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _VGGSlices(nn.Module):
    """VGG-16's conv trunk cut after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (`slice1` ... `slice5`,
    each keeping torchvision's layer indices so that `features.N.*` maps to `sliceK.N.*`)."""
    def __init__(self, widths=VGG16_WIDTHS):
        super().__init__()
        from torchvision.models.vgg import make_layers   # optional: only LPIPS (--perceptual_weight) needs it (~1.5 s)
        w1, w2, w3, w4, w5 = widths
        features = make_layers([w1, w1, "M", w2, w2, "M", w3, w3, w3, "M", w4, w4, w4, "M", w5, w5, w5, "M"])
        for k in range(5):
            block = nn.Sequential()
            for i in range(SLICE_BOUNDS[k], SLICE_BOUNDS[k + 1]):
                block.add_module(str(i), features[i])
            setattr(self, f"slice{k + 1}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG-16 variant: two image batches (B, 3, H, W) in
    [-1, 1] -> (B,) distances; 0 for identical images. Frozen, always in eval mode."""
    def __init__(self, widths=VGG16_WIDTHS):
        super().__init__()
        # LPIPS's input scaling (constants, not loaded: the published file's copies are the same numbers)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = _VGGSlices(widths)
        for k, width in enumerate(widths):
            setattr(self, f"lin{k}", _ChannelWeights(width))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        feats = self.net((torch.cat([x, y]) - self.shift) / self.scale)     # one pass over both batches
        total = 0.0
        for k, f in enumerate(feats):
            f = f / (f.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)    # unit length per position
            diff = (f[:n] - f[n:]).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).float().mean((1, 2, 3))
        return total


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _slice_key(key: str) -> str:
    """torchvision's `features.N.weight` -> LPIPS's `net.sliceK.N.weight`."""
    index = int(key.split(".")[1])
    k = next(k for k in range(1, 6) if index < SLICE_BOUNDS[k])
    return f"net.slice{k}.{key.split('.', 1)[1]}"


def lpips_from_state_dict(sd: dict[str, torch.Tensor], source: str, log=print) -> LPIPS:
    """An LPIPS from one of: LPIPS's own layout (`net.sliceK.N.*`, `linK.model.1.weight`; the published
    VA-VAE's `loss.perceptual_loss.*` with the prefix removed), or a torchvision vgg16 state dict
    (`features.N.*`, plus `linK.model.1.weight` if present). Without linear weights every channel counts
    equally (LPIPS's uncalibrated baseline), which is logged. Widths come from the weights.

    Raises PipelineError for other files or weights that do not fit."""
    if "features.0.weight" in sd:          # torchvision names -> LPIPS's slice names
        sd = {**{_slice_key(k): v for k, v in sd.items() if k.startswith("features.")},
              **{k: v for k, v in sd.items() if k.startswith("lin")}}
    sd = {k: v for k, v in sd.items() if not k.startswith("scaling_layer.")}
    convs = [f"net.slice{k + 1}.{FIRST_CONVS[k]}.weight" for k in range(5)]
    if not all(k in sd for k in convs):
        found = ", ".join(list(sd)[:4]) or "nothing"
        raise PipelineError(f"{source} holds no VGG-16 for LPIPS (found {found}); give a torchvision vgg16 state "
                            "dict (features.*) or the published vavae-imagenet256-f16d32-dinov2.pt.")
    model = LPIPS(tuple(sd[k].shape[0] for k in convs))
    if not any(k.startswith("lin") for k in sd):
        log(f"{source}: no LPIPS linear layers, every VGG channel weighs the same (uncalibrated LPIPS)")
        for k in range(5):
            conv = getattr(model, f"lin{k}").model[1]
            sd[f"lin{k}.model.1.weight"] = torch.full_like(conv.weight, 1.0 / conv.weight.shape[1])
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"{source} does not load into LPIPS's VGG-16: {str(err)[:300]}") from err
    return model.requires_grad_(False).eval()


#################################################################################
#                                 Weight sources                                #
#################################################################################

def training_loss_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The `loss.*` tensors of a tokenizer file (the published VA-VAE keeps its LPIPS and discriminator there);
    empty for the project's own .safetensors tokenizers. The tensors are memory-mapped, not read whole."""
    if Path(path).suffix == ".safetensors":
        tensors, _ = load_safetensors(path)
    else:
        obj = torch_load_weights(path, "a VA-VAE tokenizer", mmap=True)
        tensors = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return {k: v for k, v in tensors.items() if k.startswith("loss.") and torch.is_tensor(v)}


def build_lpips(lpips_vgg: str | Path | None, init_weights: dict[str, torch.Tensor], init_name: str | None,
                log=print) -> tuple[LPIPS, str]:
    """LPIPS from --lpips_vgg, else from the starting tokenizer's `loss.perceptual_loss.*` -> (model, source name).

    Raises PipelineError when neither holds it: nothing is downloaded."""
    if lpips_vgg:
        sd, _ = load_any_weights(lpips_vgg, "a VGG-16 state dict for LPIPS")
        sd = sd.get("state_dict", sd)
        own = _strip(sd, LPIPS_PREFIX)
        return lpips_from_state_dict(own or sd, str(lpips_vgg), log), Path(lpips_vgg).name
    own = _strip(init_weights, LPIPS_PREFIX)
    if own:
        return lpips_from_state_dict(own, str(init_name), log), f"{Path(init_name).name}:loss.perceptual_loss"
    raise PipelineError("--perceptual_weight needs VGG-16 weights, and nothing is downloaded: give --lpips_vgg "
                        "(a local torchvision vgg16 state dict), or fine-tune the published "
                        "vavae-imagenet256-f16d32-dinov2.pt (--init_from), whose loss.perceptual_loss.* is LPIPS; "
                        "or set --perceptual_weight 0.")


def build_discriminator(init_weights: dict[str, torch.Tensor], init_name: str | None,
                        log=print) -> tuple[PatchDiscriminator, str]:
    """The starting tokenizer's `loss.discriminator.*` when it has one, else a fresh 64-wide, 3-layer PatchGAN
    -> (discriminator, where it came from)."""
    own = _strip(init_weights, DISC_PREFIX)
    if own:
        disc = discriminator_from_state_dict(own, f"{init_name} (loss.discriminator.*)")
        log(f"discriminator: reused from {init_name} ({sum(p.numel() for p in disc.parameters()):,} params)")
        return disc, f"{Path(init_name).name}:loss.discriminator"
    disc = PatchDiscriminator()
    log(f"discriminator: fresh PatchGAN ({sum(p.numel() for p in disc.parameters()):,} params)")
    return disc, "fresh"
