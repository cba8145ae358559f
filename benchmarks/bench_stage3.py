"""Stage 3 throughput: images/s of stage 3's own sampler (models.sampling.sample_images: guided ODE sampling in
the device's half precision, then the fp32 VA-VAE decode) and of the decode alone.

sample_images is timed whole, one batch of --batch_size jobs per call, so the benchmark runs stage 3's code: its
autocast dtype (sampling_dtype: bf16 on GPUs with native bf16, fp16 on older ones, fp32 on the CPU), its batched
cond+uncond forward (guided_velocity) and its ODE solver. The decode is timed on its own; sampling alone is the
difference. Random weights (the adaLN and output layers are re-initialised away from zero so that the work is not
trivial): speed only.

Example:
    python benchmarks/bench_stage3.py --device cuda --model XL/1 --sampler euler --steps 32 --batch_size 64
"""
import argparse

import torch

from harness import (environment, median, peak_memory_mb, print_table, reset_peak_memory, setup_device,
                     time_steps, write_json)
from models.checkpoint import PipelineInfo
from models.lightningdit import LightningDiT, model_config
from models.sampling import sample_images, sampling_dtype
from models.transport import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT, DEFAULT_STEPS, SAMPLERS
from models.vavae import VAVAE, VAVAE_CONFIGS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="size, e.g. XL/1 (default XL/1 on GPU, S/2 on CPU)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps")
    parser.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="timestep shift")
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--batch_size", type=int, default=None, help="images per batch (default 4 CPU, 64 GPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches (after one warm-up batch)")
    parser.add_argument("--vae", default="f16d32", choices=["f16d32", "narrow"],
                        help="the decoder: the published f16d32, or one 64 channels wide")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    on_gpu = device.type == "cuda"
    args.model = args.model or ("XL/1" if on_gpu else "S/2")
    args.batch_size = args.batch_size or (64 if on_gpu else 4)

    config = model_config(f"LightningDiT-{args.model}", num_classes=args.num_classes)
    model = LightningDiT(**config)
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)
    model = model.to(device).eval().requires_grad_(False)
    vae_config = {**VAVAE_CONFIGS["f16d32"], **({"ch": 64} if args.vae == "narrow" else {})}
    # the layout models.vavae.load_vavae gives stage 3 (channels_last: 1.4x faster decoding on an AVX512 CPU)
    vae = VAVAE(**vae_config).to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

    channels, side = model.in_channels, int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    users = list(range(1, args.num_classes + 1))
    info = PipelineInfo(model_config=config, users=[f"ID_{u}" for u in users], user_numbers=users,
                        latent_mean=torch.zeros(1, channels, 1, 1), latent_std=torch.ones(1, channels, 1, 1))
    jobs = [(users[i % len(users)], i // len(users)) for i in range(args.batch_size)]   # one batch
    counted = {}

    def sample():
        counted["nfe"] = sample_images(model, vae, info, jobs, guidance_scale=args.guidance_scale,
                                       num_steps=args.steps, sampler=args.sampler, shift=args.shift,
                                       batch_size=args.batch_size, device=str(device), progress=False)[1]

    latents = torch.randn(args.batch_size, channels, side, side, device=device)

    @torch.no_grad()
    def decode():
        vae.decode(latents)

    reset_peak_memory(device)
    total_s = median(time_steps(sample, args.repeats, 1, device))
    decode_s = median(time_steps(decode, args.repeats, 1, device))
    sample_s = max(total_s - decode_s, 1e-9)
    nfe = counted["nfe"]
    autocast = sampling_dtype(str(device))
    row = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "nfe": nfe,
           "cfg": args.guidance_scale, "batch": args.batch_size, "vae": args.vae,
           "autocast": str(autocast or torch.float32).removeprefix("torch."),
           "sample_img_per_s": args.batch_size / sample_s,
           "decode_img_per_s": args.batch_size / decode_s,
           "total_img_per_s": args.batch_size / total_s,
           "ms_per_forward": 1e3 * sample_s / nfe if nfe > 0 else None,
           "peak_mem_MB": peak_memory_mb(device)}
    print_table([row], ["model", "sampler", "steps", "batch", "autocast", "sample_img_per_s", "decode_img_per_s",
                        "total_img_per_s", "ms_per_forward", "peak_mem_MB"],
                title=f"stage 3 sampling + decoding ({environment(device)['device']})")
    write_json(args.json_out, {"benchmark": "stage3", "env": environment(device), "args": vars(args),
                               "results": [row]})


if __name__ == "__main__":
    main()
