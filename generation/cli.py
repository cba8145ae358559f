"""Stage 3's command line (stage3_inference.py)."""
import argparse

from common.config import (DistinctValues, Number, add_config_flag, new_parser, non_negative_float,
                           non_negative_int, open_fraction, options_class, positive_float, positive_int, probability)
from common.device import add_device_flag
from common.flag_groups import (add_batch_size_flag, add_devices_flag, add_latent_dir_flag, add_output_dir_flag,
                                add_samples_per_user_flag, add_seed_flag, add_tokenizer_flag)
from models.transport import (DEFAULT_CLASSIFIER_INTERVAL, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT,
                              DEFAULT_STEPS, SAMPLERS)

DESCRIPTION = "Stage 3: generate micro-Doppler images for chosen users from a stage 2 checkpoint."
REQUIRED = ["dit_checkpoint", "vavae_path", "output_dir", "user_ids"]
# SDEdit's strength: 1 starts from pure noise (today's sampling), towards 0 a copy of the real image (0 itself is one)
anchor_strength = Number(float, low=0, high=1, low_open=True, name="anchor_strength")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    files = p.add_argument_group("inputs and outputs")
    files.add_argument("--dit_checkpoint", help="stage 2 checkpoint, e.g. trained_models/checkpoints/best.ckpt")
    add_tokenizer_flag(files, "the tokenizer used in stage 1")
    add_output_dir_flag(files, "micro_doppler_userNN_KKK.png and micro_doppler_grid.png go here")
    images = p.add_argument_group("users and images")
    images.add_argument("--user_ids", type=non_negative_int, nargs="+", action=DistinctValues,
                        help="numbers in the user folder names (ID_3 -> 3)")
    add_samples_per_user_flag(images, "images per user")
    add_seed_flag(images, "same seed, same images")
    add_batch_size_flag(images, 16, "images sampled together")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--num_steps", type=positive_int, default=DEFAULT_STEPS, help="integration steps")
    sampling.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="ODE integrator")
    sampling.add_argument("--shift", type=positive_float, default=DEFAULT_SHIFT,
                          help="timestep shift > 0 (<1: more steps near noise)")
    guidance = p.add_argument_group("guidance")
    guidance.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE,
                          help="classifier-free guidance; 1 = no guidance, 0 = unconditional")
    guidance.add_argument("--guidance_scale_range", type=non_negative_float, nargs="+", default=None,
                          metavar=("LOW", "HIGH"),
                          help="draw each sample's classifier-free guidance scale uniformly in [LOW, HIGH] instead of "
                               "one --guidance_scale (varied samples for training); recorded in "
                               "micro_doppler_samples.json")
    guidance.add_argument("--cfg_interval_start", type=probability, default=0.0,
                          help="guide only where t >= this (0 noise, 1 image)")
    guidance.add_argument("--cfg_interval_end", type=probability, default=1.0, help="guide only where t <= this")
    guidance.add_argument("--guidance_checkpoint", default=None,
                          help="autoguidance: guide with this weaker checkpoint of the same run "
                               "(checkpoints/early.ckpt) instead of the unconditional model")
    guidance.add_argument("--classifier_scale", type=non_negative_float, default=0.0,
                          help="classifier guidance with stage 2's noisy-latent user classifier (0 = off)")
    guidance.add_argument("--classifier_interval_start", type=open_fraction, default=DEFAULT_CLASSIFIER_INTERVAL[0],
                          help="classifier guidance only where t >= this "
                               "(> 0: its weight (1 - t) / t grows towards noise)")
    guidance.add_argument("--classifier_interval_end", type=probability, default=DEFAULT_CLASSIFIER_INTERVAL[1],
                          help="classifier guidance only where t <= this")
    anchored = p.add_argument_group("real-anchored sampling (SDEdit: samples for training near real images)")
    anchored.add_argument("--real_anchored_strength", type=anchor_strength, nargs="+", default=None,
                          metavar=("S", "S_HIGH"),
                          help="start each sample from one of its user's train latents noised to t = 1 - S and "
                               "integrate to the image: S in (0, 1], 1 = from pure noise (as without the flag), "
                               "small = close to the real image; two values: S drawn per sample uniformly in "
                               "[S, S_HIGH] (DA-Fusion). Needs --latent_dir; each sample's train image is recorded "
                               "in micro_doppler_samples.json")
    add_latent_dir_flag(anchored, "stage 1's folder that stage 2 trained --dit_checkpoint on (its train.safetensors): "
                                  "the real latents --real_anchored_strength starts from")
    devices = p.add_argument_group("devices")
    add_device_flag(devices)
    add_devices_flag(devices, "processes that share the sampling, the same images as one: GPUs cuda:0..N-1 (CPU "
                              "processes with --device cpu); under torchrun/srun every process it starts samples")
    return p


# Stage 3's flags by name (common.config.Options), handed to generation.generate.generate whole.
GenerateOptions = options_class("GenerateOptions", build_parser, REQUIRED, __name__)
