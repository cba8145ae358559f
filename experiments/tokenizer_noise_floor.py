"""How much of the demo look can a tokenizer reproduce? PSNR of each simulated image against the same walk rendered
without receiver noise (same person, same jitter), and a tokenizer's reconstruction against both.

A latent 24x smaller than the image cannot carry per-pixel noise, so the noise-free rendering bounds what a
tokenizer that reproduces the signal exactly would score on the noisy image.

    python experiments/tokenizer_noise_floor.py [--tokenizer assets/demo_vavae.safetensors] [--images 60]
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.pixels import to_float, to_uint8  # noqa: E402
from data.simulate import DEMO_LOOK, sample_user, simulate_image  # noqa: E402
from models.vavae import load_vavae  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo_vavae.safetensors"))
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    quiet = dataclasses.replace(DEMO_LOOK, noise_db=(-300.0, -300.0))
    rng = np.random.default_rng(args.seed)
    noisy, clean = [], []
    for _ in range(args.images):
        person, seed = sample_user(rng), int(rng.integers(2 ** 31))
        noisy.append(np.asarray(simulate_image(person, np.random.default_rng(seed))))
        clean.append(np.asarray(simulate_image(person, np.random.default_rng(seed), look=quiet)))
    noisy, clean = (torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2) for x in (noisy, clean))
    model = load_vavae(args.tokenizer)
    with torch.no_grad():
        recon = torch.cat([to_uint8(model.decode(model.encode(to_float(noisy[i:i + 16]))))
                           for i in range(0, len(noisy), 16)])
    results = {"images": args.images, "tokenizer": Path(args.tokenizer).name,
               "noise_free_vs_noisy_db": round(psnr(clean, noisy).mean().item(), 2),
               "reconstruction_vs_noisy_db": round(psnr(recon, noisy).mean().item(), 2),
               "reconstruction_vs_noise_free_db": round(psnr(recon, clean).mean().item(), 2)}
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
