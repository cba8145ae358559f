"""Stage 1 throughput: images/s through the VA-VAE encoder, with and without PNG loading + preprocessing.

"end_to_end" runs the pipeline's own encode_items (DataLoader over PNG files, ADM centre crop, [-1, 1],
encoder, posterior mean back to the host); "encoder" times vae.encode alone on a device-resident batch.
Random weights: only speed is measured. Configs: the official f16d32 (ch 128) and a narrow one (ch 64), each in
both weight layouts (NCHW, and channels_last as models.vavae.load_vavae loads them) and in the precisions stage 1's
--precision gives (fp32; bf16 autocast where the device runs it natively).

Example:
    python benchmarks/bench_stage1.py --device cuda --num_images 256 --batch_size 32 --json_out s1.json
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import (environment, median, peak_memory_mb, print_table, reset_peak_memory, setup_device,
                     sync, time_steps, write_json)
from common.device import bf16_supported, inference_autocast
from data.latents import encode_items
from models.vavae import VAVAE, VAVAE_CONFIGS

CONFIGS = {"f16d32": VAVAE_CONFIGS["f16d32"], "narrow": {**VAVAE_CONFIGS["f16d32"], "ch": 64}}


def write_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[tuple[Path, int]]:
    """Spectrogram-sized RGB PNGs (not square, so the crop/resize path runs), labelled round-robin."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        items.append((path, i % 4))
    return items


def bench_config(name: str, items, args, device: torch.device, layout: str, precision: str) -> dict:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    vae = VAVAE(**CONFIGS[name]).to(device, memory_format=memory_format).eval().requires_grad_(False)
    autocast = inference_autocast(precision, device)
    row = {"config": name, "params_M": sum(p.numel() for p in vae.parameters()) / 1e6, "layout": layout,
           "precision": precision, "batch": args.batch_size, "device": device.type}
    x = torch.randn(args.batch_size, 3, 256, 256, device=device)
    reset_peak_memory(device)
    with torch.no_grad(), autocast():
        times = time_steps(lambda: vae.encode(x), args.steps, args.warmup, device)
    row["encoder_img_per_s"] = args.batch_size / median(times)
    row["peak_mem_MB"] = peak_memory_mb(device)
    # End to end: the pipeline's loader + encoder over the files, best of `repeats` passes.
    passes = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        latents = encode_items(vae, items, 256, args.batch_size, args.num_workers, str(device), f"stage1 {name}",
                               autocast=autocast).latents
        sync(device)
        passes.append(time.perf_counter() - start)
    row["end_to_end_img_per_s"] = len(items) / median(passes)
    row["latent_shape"] = list(latents.shape[1:])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="f16d32,narrow")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num_images", type=int, default=None, help="default 8 on CPU, 256 on GPU")
    parser.add_argument("--batch_size", type=int, default=None, help="default 4 on CPU, 32 on GPU")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="timed encoder-only batches")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end passes over the files")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    on_gpu = device.type == "cuda"
    args.num_images = args.num_images or (256 if on_gpu else 8)
    args.batch_size = args.batch_size or (32 if on_gpu else 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), args.num_images)
        precisions = ["32-true"] + (["bf16-mixed"] if bf16_supported(device) else [])
        for name in args.configs.split(","):
            for layout in ("contiguous", "channels_last"):
                for precision in precisions:
                    rows.append(bench_config(name.strip(), items, args, device, layout, precision))
    print_table(rows, ["config", "params_M", "layout", "precision", "batch", "device", "encoder_img_per_s",
                       "end_to_end_img_per_s", "peak_mem_MB"],
                title=f"stage 1 VA-VAE encoding ({environment(device)['device']})")
    write_json(args.json_out, {"benchmark": "stage1", "env": environment(device), "args": vars(args),
                               "results": rows})


if __name__ == "__main__":
    main()
