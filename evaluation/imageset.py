"""Image sets for evaluation: files decoded once, kept in memory as small uint8 tensors."""
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common.pixels import to_uint8
from data.images import try_load_image

THUMB_SIZE = 32         # pixel-space memorisation view: coarse enough to ignore decoder noise


#################################################################################
#                                  Decoding                                     #
#################################################################################

class _Files(Dataset):
    """Decode files in worker processes; a broken file yields ok=False instead of stopping the run."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = try_load_image(self.paths[index], self.image_size)
        if image is None:
            return index, torch.zeros(3, self.image_size, self.image_size), False
        return index, image, True


def iterate_images(paths: list[Path], image_size: int, batch_size: int,
                   num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (indices, images in [-1,1] at image_size, ok mask) in file order."""
    loader = DataLoader(_Files(paths, image_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    for index, images, ok in loader:
        yield index, images, ok


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize; identity when already at size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


#################################################################################
#                                  Image sets                                   #
#################################################################################

@dataclass
class ImageSet:
    """Readable images of one split: files, class indices, classifier-size pixels, pixel thumbnails."""
    paths: list[Path]
    labels: torch.Tensor            # (N,) class index (position of the user in scan_dataset order)
    images: torch.Tensor            # (N, 3, S, S) uint8 at the classifier resolution
    thumbs: torch.Tensor            # (N, 3 * THUMB_SIZE^2) float in [-1, 1]

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, mask: torch.Tensor) -> "ImageSet":
        keep = mask.nonzero().flatten().tolist()
        return ImageSet([self.paths[i] for i in keep], self.labels[mask], self.images[mask], self.thumbs[mask])


def load_set(paths: list[Path], labels: list[int], image_size: int, classifier_size: int,
             batch_size: int = 64, num_workers: int = 0) -> ImageSet:
    """Decode `paths` at image_size (the generator's resolution), keep classifier-size uint8 copies.

    Unreadable files are dropped (try_load_image already warned with their name).
    """
    n = len(paths)
    images = torch.zeros(n, 3, classifier_size, classifier_size, dtype=torch.uint8)
    thumbs = torch.zeros(n, 3 * THUMB_SIZE * THUMB_SIZE)
    ok_all = torch.zeros(n, dtype=torch.bool)
    for index, batch, ok in iterate_images(paths, image_size, batch_size, num_workers):
        images[index] = to_uint8(resize(batch, classifier_size))
        thumbs[index] = resize(batch, THUMB_SIZE).flatten(1)
        ok_all[index] = ok
    full = ImageSet(list(paths), torch.tensor(labels, dtype=torch.long).reshape(-1), images, thumbs)
    return full if bool(ok_all.all()) else full.select(ok_all)
