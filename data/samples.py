"""The generated samples' file names: what stage 3 writes and stage 4 (and its export) reads.

A convention of the data, not of the sampler, so that stage 4 need not import stage 3.
"""
import re
from pathlib import Path

IMAGE_NAME = "micro_doppler_user{user:02d}_{sample:03d}.png"          # user: folder number (ID_3 -> 3); sample from 1
IMAGE_PATTERN = re.compile(r"micro_doppler_user(\d+)_(\d+)\.png")    # every name IMAGE_NAME makes, and only those
GRID_NAME = "micro_doppler_grid.png"
# Each sample's recipe (guidance scale, real anchor: its train image), written with per-sample recipes only
# (stage 3's --guidance_scale_range, --real_anchored_strength; generation/recipes.py)
MANIFEST_NAME = "micro_doppler_samples.json"


def sample_name(user: int, sample: int) -> str:
    """File name of sample `sample` (counted from 1) of user number `user`."""
    return IMAGE_NAME.format(user=user, sample=sample)


def remove_stale_samples(folder: Path, keep: set[str] = frozenset()) -> int:
    """Delete a folder's micro_doppler_userNN_KKK.png files not named in `keep`; other files are left alone.
    Returns how many were deleted."""
    stale = [p for p in folder.iterdir() if IMAGE_PATTERN.fullmatch(p.name) and p.name not in keep and p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)
