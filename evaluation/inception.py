"""Optional Inception-v3 features for the standard FID/KID, from a local torchvision state dict only."""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.errors import PipelineError
from common.io import load_any_weights
from common.progress import progress_bar
from evaluation.imageset import iterate_images

INCEPTION_SIZE = 299


def load_inception(path: str | Path, device: torch.device) -> nn.Module:
    """torchvision Inception-v3 with its classifier removed, so forward() returns 2048-d pool features.

    Nothing is downloaded: the weights must be a local state dict of
    torchvision.models.inception_v3 (e.g. IMAGENET1K_V1 saved with torch.save(model.state_dict())).
    """
    state, _ = load_any_weights(path, "a torchvision Inception-v3 state dict (--inception_weights)")
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"--inception_weights {path} is not a torchvision Inception-v3 state dict "
                            f"(inception_v3(aux_logits=True)): {str(err).splitlines()[0]}. Save one with "
                            "torch.save(torchvision.models.inception_v3(weights='IMAGENET1K_V1').state_dict(), PATH)") from err
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, paths: list[Path], image_size: int, batch_size: int,
                       num_workers: int, device: torch.device, desc: str) -> torch.Tensor:
    """2048-d features in the usual convention: bilinear resize to 299x299, inputs in [-1, 1].

    [-1, 1] is what torchvision's transform_input=True produces from ImageNet-normalised input,
    which is the normalisation these weights were trained with. Unreadable files are dropped,
    as in the classifier's image sets.
    """
    feats = []
    for _, batch, ok in progress_bar(iterate_images(paths, image_size, batch_size, num_workers),
                             total=-(-len(paths) // batch_size), desc=f"inception {desc}", leave=False):
        x = F.interpolate(batch[ok], size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        if x.shape[0]:
            feats.append(model(x.to(device)).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 2048)
