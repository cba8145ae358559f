"""Classical spectrogram augmentation: what a radar user does by hand to get more training images per person.

Time roll, a small Doppler (frequency) shift and SpecAugment-style time and frequency masks (Park et al. 2019,
"SpecAugment", Interspeech), applied to a batch of images with time on the width and Doppler on the height
(row 0 = highest Doppler). No flips: a horizontal flip plays the gait backwards and a vertical one swaps
approaching and receding Doppler, invariances the data do not have.

Each image draws its own roll, shift and masks from a torch.Generator, so a seeded run is reproducible and two
classifiers given generators with the same seed see the same augmented images.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Classical:
    """One classical recipe; every fraction is of the image's width (time) or height (Doppler). 0 turns a part off.

    time_roll: each image is rolled (circularly) along time by up to this fraction either way: a walking
        spectrogram is quasi-periodic and a window can start at any phase of the gait.
    freq_shift: shifted along Doppler by up to this fraction either way, the rows entering repeating the edge:
        kept small because the Doppler position encodes walking speed, a trait of the person.
    time_masks, time_mask_width: how many time masks, each up to this fraction of the width wide.
    freq_masks, freq_mask_width: the same along Doppler. A masked band takes the image's median colour per
        channel, its background (noise floor), as SpecAugment's masks take the mean of normalised features.
    """
    time_roll: float = 0.0
    freq_shift: float = 0.0
    time_masks: int = 0
    time_mask_width: float = 0.0
    freq_masks: int = 0
    freq_mask_width: float = 0.0

    @property
    def enabled(self) -> bool:
        return (self.time_roll > 0 or self.freq_shift > 0 or (self.time_masks > 0 and self.time_mask_width > 0)
                or (self.freq_masks > 0 and self.freq_mask_width > 0))


# The recipes compared on the held-out fifth of the demo's train images, never on val (docs/experiments.md, "A
# judge that has learned"): roll+shift scored highest (held-out top-1 0.99, the lowest cross-entropy, two seeds in
# both regimes); masks on top of it lowered both. It is the judge's recipe and the augmentation arms'.
RECIPES = {
    "none": Classical(),
    "roll": Classical(time_roll=0.5),
    "roll+shift": Classical(time_roll=0.5, freq_shift=0.03),
    "roll+shift+masks": Classical(time_roll=0.5, freq_shift=0.03, time_masks=1, time_mask_width=0.15,
                                  freq_masks=1, freq_mask_width=0.1),
    "roll+shift+2x masks": Classical(time_roll=0.5, freq_shift=0.03, time_masks=2, time_mask_width=0.15,
                                     freq_masks=2, freq_mask_width=0.1),
}
DEFAULT = RECIPES["roll+shift"]


def _offsets(n: int, max_fraction: float, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) int64 uniform in [-m, m], m = round(max_fraction * length)."""
    m = round(max_fraction * length)
    return torch.randint(-m, m + 1, (n,), generator=gen) if m > 0 else torch.zeros(n, dtype=torch.long)


def _masks(n: int, count: int, max_fraction: float, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) bool: `count` bands per image, each of a width uniform in [0, max_fraction * length] at a
    uniform start (SpecAugment's draw)."""
    hit = torch.zeros(n, length, dtype=torch.bool)
    widest = round(max_fraction * length)
    if count == 0 or widest == 0:
        return hit
    position = torch.arange(length)
    for _ in range(count):
        width = torch.randint(0, widest + 1, (n, 1), generator=gen)
        start = (torch.rand(n, 1, generator=gen) * (length - width + 1)).long()
        hit |= (position >= start) & (position < start + width)
    return hit


def background(images: torch.Tensor) -> torch.Tensor:
    """(N, C) per-image, per-channel median of images (N, C, H, W), same dtype: the colour of a spectrogram's noise
    floor, which covers most of it, and what a mask fills in."""
    return images.flatten(2).float().median(2).values.to(images.dtype)


def augment(batch: torch.Tensor, recipe: Classical, gen: torch.Generator,
            fill: torch.Tensor | None = None) -> torch.Tensor:
    """batch (N, C, H, W) of any dtype -> augmented (N, C, H, W), same dtype; W is time, H is Doppler.

    Roll along time (circular), then shift along Doppler (edge rows repeated), then masks filled with `fill`
    ((N, C), default background(batch); pass it when the same images are augmented again and again). Every image
    draws from `gen` in a fixed order (roll, shift, time masks, frequency masks), whatever the recipe turns off.
    """
    n, _, h, w = batch.shape
    if n == 0 or not recipe.enabled:
        return batch
    dx, dy = _offsets(n, recipe.time_roll, w, gen), _offsets(n, recipe.freq_shift, h, gen)
    columns = (torch.arange(w)[None, :] - dx[:, None]) % w                       # (N, W): output column <- input
    rows = (torch.arange(h)[None, :] - dy[:, None]).clamp(0, h - 1)              # (N, H)
    out = batch.gather(3, columns[:, None, None, :].expand_as(batch))
    out = out.gather(2, rows[:, None, :, None].expand_as(batch))
    time_hit = _masks(n, recipe.time_masks, recipe.time_mask_width, w, gen)
    freq_hit = _masks(n, recipe.freq_masks, recipe.freq_mask_width, h, gen)
    if time_hit.any() or freq_hit.any():
        hit = (time_hit[:, None, None, :] | freq_hit[:, None, :, None])          # (N, 1, H, W)
        fill = background(batch) if fill is None else fill
        out = torch.where(hit, fill[:, :, None, None].to(batch.dtype), out)
    return out
