"""Render the mmGait velocity-time histograms (../shared/data/mmgait60, real 60 GHz radar recordings of people
walking; see its README) as 256x256 spectrogram images in the stage 1 layout, to check the pipeline on real data.

Each person's recording is cut into windows of --window columns (~10 frames/s) with hop --hop; windows from the
first 80% of the recording are train, from the last 20% val, so no window is in both. An image is
log(1 + counts) on one fixed scale for every image (absolute levels are kept, not stretched per image), positive
velocity at the top, time on x, resized to 256x256 (bilinear) and coloured with matplotlib's jet map.

    python experiments/render_mmgait.py --source ../shared/data/mmgait60 --output_dir /tmp/mmgait
writes /tmp/mmgait/{train,val}/ID_<volunteer>/w<start>.png. The data stay outside the repository.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image


def windows(num_columns: int, window: int, hop: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Start columns of the train and val windows: train windows end before the split column, val ones start
    at or after it."""
    split = int(round(num_columns * (1 - val_fraction)))
    train = list(range(0, split - window + 1, hop))
    val = list(range(split, num_columns - window + 1, hop))
    return train, val


def render(hist: np.ndarray, scale: float, size: int = 256) -> np.ndarray:
    """(velocity_bins, T) counts -> (size, size, 3) uint8: log(1 + counts) / scale, positive velocity on top."""
    image = np.log1p(hist)[::-1] / scale
    resized = F.interpolate(torch.from_numpy(image.copy())[None, None], size=(size, size), mode="bilinear",
                            align_corners=False)[0, 0].clamp(0, 1).numpy()
    return (colormaps["jet"](resized)[..., :3] * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/mmgait60")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hop", type=int, default=16)
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--max_people", type=int, default=None)
    args = parser.parse_args()
    files = sorted(Path(args.source).glob("vol*.npz"))[:args.max_people]
    if not files:
        raise SystemExit(f"no vol*.npz in {args.source}")
    recordings = {int(f.stem[3:]): np.load(f)["hist"].astype(np.float32) for f in files}
    scale = float(np.log1p(max(h.max() for h in recordings.values())))     # one scale for every image
    for person, hist in recordings.items():
        starts = windows(hist.shape[1], args.window, args.hop, args.val_fraction)
        for split, split_starts in zip(("train", "val"), starts):
            folder = Path(args.output_dir) / split / f"ID_{person}"
            folder.mkdir(parents=True, exist_ok=True)
            for start in split_starts:
                Image.fromarray(render(hist[:, start:start + args.window], scale)).save(folder / f"w{start:05d}.png")
        print(f"ID_{person}: {hist.shape[1]} columns -> {len(starts[0])} train / {len(starts[1])} val images")

if __name__ == "__main__":
    main()
