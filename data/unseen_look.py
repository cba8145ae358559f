"""A second spectrogram renderer, written apart from `data.simulate`'s, for testing on a look never trained on.

The demo tokenizer is trained on `data.simulate.sample_look`'s family (one STFT recipe, matplotlib colour
maps, PNG). This renderer makes what another lab's pipeline might: a 77 GHz radar whose Doppler band the
limbs nearly fill, a Gaussian-window STFT with its own hop, magnitude in dB with a gamma curve, a
parula-like colour map none of the training maps resemble, bicubic resizing and JPEG compression.
It reuses only the body and radar physics (`simulated_walk`), so the *person* is the same kind of data.

    python -m data.unseen_look --output_dir D --num_users N --train_per_user M --val_per_user K --seed S
"""
from pathlib import Path

import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from PIL import Image

from data.simulate import C, GaitParams, RadarLook, dataset_parser, simulated_walk, write_people

# Anchor colours of a parula-like map (dark blue -> blue -> teal -> green-yellow -> yellow).
PARULA_LIKE = LinearSegmentedColormap.from_list(
    "parula_like", ["#352a87", "#0363e1", "#1485d4", "#06a7c6", "#38b99e", "#92bf73", "#d9ba56", "#fcce2e",
                    "#f9fb0e"])
UNSEEN_RADAR = RadarLook(carrier_hz=77e9, prf=4 * 5.5 / (C / 77e9), duration_s=2.0, noise_db=(-58.0, -48.0),
                         speed_scale=(0.95, 1.2))
GAUSS_SIGMA_S, HOP_S, NFFT, RANGE_DB, GAMMA = 0.012, 0.004, 512, 40.0, 0.8


def gaussian_stft_db(x: np.ndarray, prf: float) -> np.ndarray:
    """|STFT| in dB (max 0) with a Gaussian window of GAUSS_SIGMA_S and a fixed hop; rows = Doppler, low first."""
    x = x - np.convolve(x, np.ones(64) / 64, mode="same")          # moving-average clutter filter
    sigma = GAUSS_SIGMA_S * prf
    half = int(3 * sigma)
    window = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    hop = max(1, int(HOP_S * prf))
    starts = np.arange(0, x.size - window.size, hop)
    frames = x[starts[:, None] + np.arange(window.size)] * window
    mag = np.abs(np.fft.fftshift(np.fft.fft(frames, n=max(NFFT, window.size), axis=1), axes=1)).T
    db = 20 * np.log10(mag + 1e-12)
    return db - db.max()


def render_unseen(s_db: np.ndarray, image_size: int = 256) -> Image.Image:
    """dB -> [0, 1] over RANGE_DB with a gamma curve, parula-like colours, bicubic resize, positive Doppler up."""
    level = (np.clip(s_db, -RANGE_DB, 0.0) / RANGE_DB + 1.0) ** GAMMA
    rgb = (PARULA_LIKE(level[::-1])[..., :3] * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC)


def write_unseen_dataset(output_dir: str | Path, num_users: int, train_per_user: int, val_per_user: int,
                         seed: int, image_size: int = 256, jpeg_quality: int = 88) -> None:
    """output_dir/{train,val}/ID_n/*.jpg in the unseen look; deterministic in `seed`."""
    def make_image(params: GaitParams, rng: np.random.Generator) -> Image.Image:
        walk = simulated_walk(params, rng, UNSEEN_RADAR)
        return render_unseen(gaussian_stft_db(walk, UNSEEN_RADAR.prf), image_size)

    write_people(output_dir, num_users, train_per_user, val_per_user, seed, make_image, extension="jpg",
                 desc="unseen look", quality=jpeg_quality)


def main(argv: list[str] | None = None) -> None:
    args = dataset_parser("Simulated walking people in a look the demo tokenizer never saw.").parse_args(argv)
    write_unseen_dataset(args.output_dir, args.num_users, args.train_per_user, args.val_per_user, args.seed,
                         args.image_size)


if __name__ == "__main__":
    main()
