"""The VA-VAE foundation-model alignment of the tokenizer: a frozen torchvision backbone, the latent's projection
onto its features, and VA-VAE's margin loss between the two."""
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import PipelineError
from common.io import load_any_weights

COS_MARGIN, DISTMAT_MARGIN = 0.5, 0.25    # VA-VAE's margins for the alignment term
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


#################################################################################
#                          Foundation-model alignment                           #
#################################################################################

class FoundationFeatures(nn.Module):
    """A frozen torchvision backbone: images in [-1, 1] -> (B, C, h, w) patch features."""
    def __init__(self, backbone: nn.Module, kind: str, input_size: int | None = None):
        super().__init__()
        self.backbone, self.kind, self.input_size = backbone.eval().requires_grad_(False), kind, input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)           # frozen: BatchNorm statistics never move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        b = self.backbone
        if self.kind == "resnet":               # layer3 is stride 16: the latent grid of an f16 tokenizer
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            return b.layer3(b.layer2(b.layer1(x)))
        tokens = b.encoder(torch.cat([b.class_token.expand(x.shape[0], -1, -1),
                                      b.conv_proj(x).flatten(2).transpose(1, 2)], dim=1))[:, 1:]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)


def build_foundation(path: str | Path) -> FoundationFeatures:
    """A torchvision ResNet or ViT from a local state-dict file; nothing is downloaded."""
    import torchvision.models as tvm   # optional: only the alignment term (--align_weights) needs it (~1.5 s)
    sd, _ = load_any_weights(path, "a torchvision ResNet or ViT state dict")
    sd = sd.get("state_dict", sd.get("model", sd))
    if "conv_proj.weight" in sd:
        hidden, patch = sd["conv_proj.weight"].shape[0], sd["conv_proj.weight"].shape[-1]
        size = int(round((sd["encoder.pos_embedding"].shape[1] - 1) ** 0.5)) * patch
        layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
        mlp = next(v.shape[0] for k, v in sd.items() if k.startswith("encoder.layers.encoder_layer_0.mlp.")
                   and v.dim() == 2)
        heads = {768: 12, 1024: 16, 1280: 16}.get(hidden, max(1, hidden // 64))
        net, kind = tvm.VisionTransformer(size, patch, layers, heads, hidden, mlp), "vit"
    elif "layer1.0.conv1.weight" in sd:
        block = tvm.resnet.Bottleneck if "layer1.0.conv3.weight" in sd else tvm.resnet.BasicBlock
        counts = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        net, kind, size = tvm.ResNet(block, counts, num_classes=sd["fc.weight"].shape[0]), "resnet", None
    else:
        raise PipelineError(f"{path} is neither a torchvision ResNet nor ViT state dict "
                            f"(first keys: {', '.join(list(sd)[:4])}).")
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"{path} does not load into a torchvision {kind}: {str(err)[:300]}") from err
    return FoundationFeatures(net, kind, size)


def alignment_loss(z: torch.Tensor, proj: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-VAE's VF loss: marginal cosine similarity + marginal distance-matrix similarity.

    The margins leave the latent free once it is "close enough" to the foundation features, so the
    term shapes the latent space without fighting reconstruction.
    """
    zp = proj(z.float())           # fp32: the margins act on cosines near 1, where bf16 is coarse
    feats = F.interpolate(feats.float(), size=zp.shape[-2:], mode="bilinear", align_corners=False)
    mcos = F.relu(1 - COS_MARGIN - F.cosine_similarity(zp, feats, dim=1)).mean()
    zn, fn = F.normalize(zp.flatten(2), dim=1), F.normalize(feats.flatten(2), dim=1)
    gram_z, gram_f = zn.transpose(1, 2) @ zn, fn.transpose(1, 2) @ fn          # (B, hw, hw) cosines
    mdms = F.relu((gram_z - gram_f).abs() - DISTMAT_MARGIN).mean()
    return mcos, mdms


def alignment_term(foundation: Callable[[], nn.Module] | None, align_weights: str | Path | None,
                   align_weight: float, embed_dim: int, image_size: int, device: torch.device,
                   log=print) -> tuple[nn.Module | None, nn.Conv2d | None]:
    """The optional VA-VAE alignment: the frozen foundation model and the latent's projection onto its features."""
    if foundation is None and not align_weights:
        log("alignment term off (no --align_weights file given): plain KL-VAE training")
        return None, None
    fm = (foundation() if foundation is not None else build_foundation(align_weights)).to(device)
    with torch.no_grad():
        dim = fm(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
    proj = nn.Conv2d(embed_dim, dim, 1, bias=False).to(device)   # VA-VAE's linear_proj
    log(f"alignment term on: weight {align_weight}, foundation features {dim}-dim")
    return fm, proj
