"""Image sets for evaluation: files decoded once, kept in memory as small uint8 tensors."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.pixels import to_uint8
from data.images import ImageFiles, skip_message, skipped_count

THUMB_SIZE = 32         # pixel-space memorisation view: coarse enough to ignore decoder noise


#################################################################################
#                                  Decoding                                     #
#################################################################################

def iterate_images(paths: list[Path], image_size: int, batch_size: int, num_workers: int,
                   log: Callable[[str], None] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (indices (B,), images (B, 3, S, S) in [-1,1] at image_size, ok mask (B,)) in file order; an
    unreadable file has ok False and zeros, and is named with `log` when given."""
    loader = DataLoader(ImageFiles(paths, image_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=list)
    blank = torch.zeros(3, image_size, image_size)
    for batch in loader:
        for read in batch:
            if read.image is None and log is not None:
                log(skip_message(paths[read.index], read.problem))
        yield (torch.tensor([read.index for read in batch]),
               torch.stack([blank if read.image is None else read.image for read in batch]),
               torch.tensor([read.image is not None for read in batch]))


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

    def thumbnails(self) -> "ImageSet":
        """The same set with the THUMB_SIZE thumbnails as its uint8 images (N, 3, THUMB_SIZE, THUMB_SIZE)."""
        images = to_uint8(self.thumbs.view(len(self), 3, THUMB_SIZE, THUMB_SIZE))
        return ImageSet(self.paths, self.labels, images, self.thumbs)


def load_set(paths: list[Path], labels: list[int], image_size: int, classifier_size: int,
             batch_size: int = 64, num_workers: int = 0, log: Callable[[str], None] = print) -> ImageSet:
    """Decode `paths` at image_size (the generator's resolution), keep classifier-size uint8 copies.

    Unreadable files are dropped: named with `log` as they are met, and counted at the end.
    """
    n = len(paths)
    images = torch.zeros(n, 3, classifier_size, classifier_size, dtype=torch.uint8)
    thumbs = torch.zeros(n, 3 * THUMB_SIZE * THUMB_SIZE)
    ok_all = torch.zeros(n, dtype=torch.bool)
    for index, batch, ok in iterate_images(paths, image_size, batch_size, num_workers, log):
        images[index] = to_uint8(resize(batch, classifier_size))
        thumbs[index] = resize(batch, THUMB_SIZE).flatten(1)
        ok_all[index] = ok
    if not bool(ok_all.all()):
        log(skipped_count(int((~ok_all).sum())))
    full = ImageSet(list(paths), torch.tensor(labels, dtype=torch.long).reshape(-1), images, thumbs)
    return full if bool(ok_all.all()) else full.select(ok_all)
