"""The file names of generated samples: a convention of the data that stage 3 writes and stage 4 reads.

A sample is `micro_doppler_userNN_KKK.png`: NN the user's folder number (3 for ID_3), KKK the sample
number from 1. Both stages import the convention from here, so neither imports the other.
"""
import re
from pathlib import Path

IMAGE_PATTERN = re.compile(r"micro_doppler_user(\d+)_(\d+)\.png")   # every name sample_name makes, and only those


def sample_name(user_number: int, k: int) -> str:
    """File name of sample `k` (from 1) of the user with folder number `user_number`."""
    return f"micro_doppler_user{user_number:02d}_{k:03d}.png"


def remove_stale_samples(folder: Path, keep: set[str] = frozenset()) -> int:
    """Delete a folder's micro_doppler_userNN_KKK.png files not named in `keep`; other files are left alone.

    Returns the number of files deleted.
    """
    stale = [p for p in folder.iterdir() if IMAGE_PATTERN.fullmatch(p.name) and p.name not in keep and p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)
