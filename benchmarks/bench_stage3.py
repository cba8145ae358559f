"""Stage 3 throughput: images/s of guided sampling (LightningDiT + ODE sampler) and VA-VAE decoding.

The loop is models.sampling.sample_images's: bf16 (fp16 without bf16) autocast on CUDA, guided_velocity with one
batched cond+uncond forward per evaluation, sample_ode, then an fp32 decode. Random weights (the adaLN
and output layers are re-initialised away from zero so that the work is not trivial): speed only.

Example:
    python benchmarks/bench_stage3.py --device cuda --model XL/1 --sampler euler --steps 32 --batch_size 64
"""
import argparse

import torch

from harness import (environment, median, peak_memory_mb, print_table, reset_peak_memory, setup_device,
                     time_steps, write_json)
from models.lightningdit import LightningDiT, model_config
from models.transport import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT, DEFAULT_STEPS, SAMPLERS,
                              CountedVelocity, guided_velocity, sample_ode)
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
    parser.add_argument("--vae", default="f16d32", choices=["f16d32", "narrow", "none"])
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    on_gpu = device.type == "cuda"
    args.model = args.model or ("XL/1" if on_gpu else "S/2")
    args.batch_size = args.batch_size or (64 if on_gpu else 4)
    half = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else None

    model = LightningDiT(**model_config(f"LightningDiT-{args.model}", num_classes=args.num_classes))
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)
    model = model.to(device).eval().requires_grad_(False)
    vae_config = {**VAVAE_CONFIGS["f16d32"], **({"ch": 64} if args.vae == "narrow" else {})}
    vae = VAVAE(**vae_config).to(device).eval().requires_grad_(False) if args.vae != "none" else None

    side = model.pos_embed.shape[1] ** 0.5 * model.patch_size
    noise = torch.randn(args.batch_size, model.in_channels, int(side), int(side), device=device)
    y = torch.arange(args.batch_size, device=device) % args.num_classes
    latents = {}

    @torch.no_grad()
    def sample():
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            velocity = CountedVelocity(guided_velocity(model, y, model.num_classes, args.guidance_scale))
            latents["z"] = sample_ode(velocity, noise, args.steps, args.sampler, args.shift)
        latents["nfe"] = velocity.calls

    @torch.no_grad()
    def decode():
        vae.decode(latents["z"].float())

    reset_peak_memory(device)
    sample_s = median(time_steps(sample, args.repeats, 1, device))
    decode_s = median(time_steps(decode, args.repeats, 1, device)) if vae is not None else 0.0
    nfe = latents["nfe"]
    row = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "nfe": nfe,
           "cfg": args.guidance_scale, "batch": args.batch_size, "vae": args.vae,
           "sample_img_per_s": args.batch_size / sample_s,
           "decode_img_per_s": args.batch_size / decode_s if decode_s else None,
           "total_img_per_s": args.batch_size / (sample_s + decode_s),
           "ms_per_forward": 1e3 * sample_s / nfe if nfe > 0 else None,
           "peak_mem_MB": peak_memory_mb(device)}
    print_table([row], ["model", "sampler", "steps", "batch", "sample_img_per_s", "decode_img_per_s",
                        "total_img_per_s", "ms_per_forward", "peak_mem_MB"],
                title=f"stage 3 sampling + decoding ({environment(device)['device']})")
    write_json(args.json_out, {"benchmark": "stage3", "env": environment(device), "args": vars(args),
                               "results": [row]})


if __name__ == "__main__":
    main()
